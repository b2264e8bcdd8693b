"""``consolidate CKPT OUT``: a sharded training checkpoint -> one Hugging Face model directory.

Sources (:mod:`post_training.checkpointing.tools.consolidate_sources`): the toolkit's / Megatron-LM's
megatron-core dist checkpoints (``torch_dist``, any TP/PP), Megatron-LM legacy checkpoints
(``mp_rank_XX[_YYY]/model_optim_rng.pt``) and DeepSpeed ZeRO checkpoints (needs deepspeed).
No model is built and no process group is needed: tensors are read, renamed to HF names
(:mod:`post_training.checkpointing.tools.consolidate_mcore`) and written one at a time, into safetensors
shards whose headers are planned from the checkpoint's metadata, so memory stays near one
layer whatever the model or shard size. Output: ``model-XXXXX-of-YYYYY.safetensors``,
``model.safetensors.index.json``, ``config.json``, ``generation_config.json`` and the
tokenizer files, staged and renamed into place (nothing partial is left on failure).

A quantized (ModelOpt) checkpoint is refused: plain weights would silently drop the
quantization; ``scripts/export.sh`` writes it with its scales. So is one with LoRA adapters
(ModelOpt ``peft``): ``merge-lora CKPT OUT`` writes it with them folded in (``lora=True``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from post_training.io.export_files import INDEX
from post_training.io.formats import parse_size
from post_training.utils import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
# Files of the source HF directory that are not part of the consolidated model.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt|onnx)$|.*\.index\.json$|config\.json$")
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="checkpoint: dist (save root or iter dir), Megatron-LM legacy, or ZeRO")
    parser.add_argument("out", help="output HF model directory")
    parser.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                        help="output dtype (default: as stored in the checkpoint)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--hf-config", default=None, metavar="DIR",
                        help="HF config.json + tokenizer of the model, for checkpoints without hf_config/")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full pickle loads (legacy args with foreign classes, DeepSpeed files)")


def open_checkpoint(ckpt: Path, hf_config: Path | None = None, trust_pickle: bool = False, lora: bool = False):
    """Detect the checkpoint kind and return its :class:`~consolidate_sources.Plan`; ``lora``:
    fold the checkpoint's LoRA adapters in (``merge-lora CKPT OUT``; dist checkpoints only)."""
    from post_training.io import layout as cio
    from post_training.checkpointing.tools import consolidate_sources as cs

    if not ckpt.is_dir():
        raise UsageError(f"checkpoint not found: {ckpt}" if not ckpt.exists() else
                         f"{ckpt} is a file; consolidate takes a checkpoint directory")
    if (tag := cs.zero_tag_dir(ckpt)) is not None:
        return cs.open_zero(tag, hf_config, trust_pickle)
    it = cio.read_tracker(ckpt) if cio.is_checkpoint_root(ckpt) else ckpt
    if cs.is_dist(it):
        return cs.open_dist(it, hf_config, trust_pickle, lora)
    if lora:
        raise UsageError(f"{ckpt} is not a toolkit dist checkpoint: merge-lora CKPT OUT merges the LoRA "
                         "adapters of those (for an HF model and a PEFT adapter: merge-lora BASE ADAPTER OUT)")
    if (legacy := cs.legacy_iter_dir(ckpt)) is not None:
        return cs.open_legacy(legacy, hf_config, trust_pickle)
    if cio.is_dist_checkpoint_dir(it):
        raise UsageError(f"{it} is an incomplete dist checkpoint: .metadata is missing")
    raise UsageError(f"{ckpt} is not a checkpoint consolidate knows: no {cio.TRACKER} with a dist or "
                     "legacy iteration, no dist checkpoint files, no DeepSpeed 'latest'")


# ----------------------------------------------------------------------------- safetensors writer


def _shard_plan(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive tensors per shard, at most ``max_bytes`` each (a larger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(sizes):
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def _header(entries: list[tuple[str, tuple[int, ...], torch.dtype, int]]) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, nbytes in entries:
        meta[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_shards(root: Path, specs: list, tensors: Iterator[tuple[str, torch.Tensor]],
                 out_dtype: torch.dtype | None, max_bytes: int) -> tuple[int, int]:
    """Stream ``tensors`` (in ``specs`` order) into shards whose headers are written first.
    Returns (shards, bytes)."""
    if sys.byteorder != "little":
        raise UsageError("safetensors is little-endian; this machine is not")
    entries = []
    for name, shape, dtype in specs:
        dt = out_dtype if out_dtype is not None and dtype.is_floating_point else dtype
        if dt not in _ST_DTYPES:
            raise UsageError(f"{name}: dtype {dt} has no safetensors name")
        entries.append((name, shape, dt, dt.itemsize * int(torch.Size(shape).numel())))
    shards = _shard_plan([e[3] for e in entries], max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, idx in zip(names, shards):
        with open(root / fname, "wb") as f:
            f.write(_header([entries[i] for i in idx]))
            for i in idx:
                name, shape, dt, nbytes = entries[i]
                got, t = next(tensors)
                if got != name or tuple(t.shape) != tuple(shape):
                    raise UsageError(f"internal: expected {name} {shape}, the reader gave {got} {tuple(t.shape)}")
                t = t.to(dt).contiguous().reshape(-1).view(torch.uint8)
                f.write(t.numpy().data)
                weight_map[name] = fname
    total = sum(e[3] for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total


def _write_side_files(root: Path, plan, dtype: torch.dtype) -> None:
    """config.json (stating the written dtype), generation config and tokenizer files."""
    cfg = dict(plan.config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    (root / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if plan.hf_dir is not None:
        for p in sorted(Path(plan.hf_dir).iterdir()):
            if p.is_file() and not _NOT_COPIED.fullmatch(p.name):
                shutil.copy2(p, root / p.name)
    if not (root / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        kw = {k: v for k, v in plan.config.items() if k != "model_type"}
        GenerationConfig.from_model_config(AutoConfig.for_model(plan.config["model_type"], **kw)) \
            .save_pretrained(root)


def consolidate_to_hf(ckpt: Path, out: Path, dtype: str = "keep", *, max_shard_size: int | str = "5GB",
                      overwrite: bool = False, trust_pickle: bool = False, hf_config: Path | None = None,
                      quiet: bool = False, lora: bool = False) -> Path:
    """Write ``ckpt`` as an HF model directory ``out`` (see the module doc). Returns ``out``."""
    from post_training.io.layout import fsync_tree
    from post_training.checkpointing.tools.outdir import check_output, staged_output

    if dtype != "keep" and dtype not in DTYPES:
        raise UsageError(f"dtype must be keep or one of {', '.join(DTYPES)} (got {dtype!r})")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    ckpt, out = Path(ckpt), Path(out)
    check_output(out, overwrite)  # before reading anything: a refusal costs nothing
    t0 = time.perf_counter()
    plan = open_checkpoint(ckpt, Path(hf_config) if hf_config else None, trust_pickle, lora)
    cast = DTYPES.get(dtype)
    main_dtype = cast or plan.specs[0][2]
    t1 = time.perf_counter()
    threads = torch.get_num_threads()
    # Streaming is copies (narrow, split, cast): one thread does them at memory speed, while
    # OpenMP workers on a busy machine spin for their peers (6x slower on 2 shared cores).
    torch.set_num_threads(1)
    try:
        with staged_output(out, overwrite) as staging:
            shards, total = write_shards(staging, plan.specs, plan.tensors(), cast, max_bytes)
            t2 = time.perf_counter()
            _write_side_files(staging, plan, main_dtype)
            umask = os.umask(0o022)
            os.umask(umask)
            for p in staging.iterdir():
                p.chmod(0o666 & ~umask)  # readable by other users (a server), as save_pretrained's
            staging.chmod(0o777 & ~umask)
            fsync_tree(staging)
    finally:
        torch.set_num_threads(threads)
    if not quiet:  # setup = imports, metadata, checks; streaming = reading and writing tensors
        print(f"consolidated {plan.kind} -> {out}: {len(plan.specs)} tensors, {total / 1e6:.1f} MB "
              f"{str(main_dtype).removeprefix('torch.')} in {shards} shard(s); setup {t1 - t0:.1f}s, "
              f"streaming {t2 - t1:.1f}s ({total / 1e6 / max(t2 - t1, 1e-9):.0f} MB/s)", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    consolidate_to_hf(Path(args.ckpt), Path(args.out), args.dtype, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, trust_pickle=args.trust_pickle, hf_config=args.hf_config)
    return 0
