"""``consolidate CKPT OUT``: a sharded training checkpoint -> one Hugging Face model directory.

Sources (:mod:`post_training.checkpointing.tools.consolidate_sources`): the toolkit's / Megatron-LM's
megatron-core dist checkpoints (``torch_dist``, any TP/PP), Megatron-LM legacy checkpoints
(``mp_rank_XX[_YYY]/model_optim_rng.pt``) and DeepSpeed ZeRO checkpoints (needs deepspeed).
No model is built and no process group is needed: tensors are read, renamed to HF names
(:mod:`post_training.checkpointing.tools.consolidate_mcore`) and written one at a time, into safetensors
shards whose headers are planned from the checkpoint's metadata, so memory stays near one
layer whatever the model or shard size (:meth:`post_training.io.safetensors_io.ShardWriter.stream`).
Output: ``model.safetensors`` or ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``,
``config.json``, ``generation_config.json`` and the tokenizer files, staged and renamed into
place (nothing partial is left on failure).

A quantized (ModelOpt) checkpoint is refused: plain weights would silently drop the
quantization; ``scripts/export.sh`` writes it with its scales. So is one with LoRA adapters
(ModelOpt ``peft``): ``merge-lora CKPT OUT`` writes it with them folded in (``lora=True``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from post_training.io.formats import DTYPES, dtype_name, parse_size, torch_dtype
from post_training.utils import UsageError


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


def _write_side_files(root: Path, plan, dtype: torch.dtype) -> None:
    """config.json (stating the written dtype), generation config and tokenizer files."""
    from post_training.io.hf_files import copy_aux_files, update_config

    (root / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    update_config(root, dtype)
    if plan.hf_dir is not None:
        copy_aux_files(Path(plan.hf_dir), root, exclude=("config.json",))
    if not (root / "generation_config.json").is_file():
        from transformers import AutoConfig, GenerationConfig

        kw = {k: v for k, v in plan.config.items() if k != "model_type"}
        GenerationConfig.from_model_config(AutoConfig.for_model(plan.config["model_type"], **kw)) \
            .save_pretrained(root)


def consolidate_to_hf(ckpt: Path, out: Path, dtype: str = "keep", *, max_shard_size: int | str = "5GB",
                      overwrite: bool = False, trust_pickle: bool = False, hf_config: Path | None = None,
                      quiet: bool = False, lora: bool = False) -> Path:
    """Write ``ckpt`` as an HF model directory ``out`` (see the module doc). Returns ``out``."""
    from post_training.io.atomic import check_output_dir, staged_dir
    from post_training.io.safetensors_io import ShardWriter

    if dtype != "keep" and dtype not in DTYPES:
        raise UsageError(f"dtype must be keep or one of {', '.join(DTYPES)} (got {dtype!r})")
    max_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    ckpt, out = Path(ckpt), Path(out)
    check_output_dir(out, overwrite)  # before reading anything: a refusal costs nothing
    t0 = time.perf_counter()
    plan = open_checkpoint(ckpt, Path(hf_config) if hf_config else None, trust_pickle, lora)
    cast = torch_dtype(dtype)
    main_dtype = cast or plan.specs[0][2]
    t1 = time.perf_counter()
    threads = torch.get_num_threads()
    # Streaming is copies (narrow, split, cast): one thread does them at memory speed, while
    # OpenMP workers on a busy machine spin for their peers (6x slower on 2 shared cores).
    torch.set_num_threads(1)
    try:
        with staged_dir(out, overwrite) as staging:
            writer = ShardWriter(staging, max_bytes)
            writer.stream(plan.specs, plan.tensors(), cast)
            shards, total = len(writer.finish()), writer.total_bytes
            t2 = time.perf_counter()
            _write_side_files(staging, plan, main_dtype)
    finally:
        torch.set_num_threads(threads)
    if not quiet:  # setup = imports, metadata, checks; streaming = reading and writing tensors
        print(f"consolidated {plan.kind} -> {out}: {len(plan.specs)} tensors, {total / 1e6:.1f} MB "
              f"{dtype_name(main_dtype)} in {shards} shard(s); setup {t1 - t0:.1f}s, "
              f"streaming {t2 - t1:.1f}s ({total / 1e6 / max(t2 - t1, 1e-9):.0f} MB/s)", flush=True)
    return out


def run(args: argparse.Namespace) -> int:
    consolidate_to_hf(Path(args.ckpt), Path(args.out), args.dtype, max_shard_size=args.max_shard_size,
                      overwrite=args.overwrite, trust_pickle=args.trust_pickle, hf_config=args.hf_config)
    return 0
