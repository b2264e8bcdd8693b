"""Readers for the checkpoints ``consolidate`` accepts; each turns one into a :class:`Plan`.

- megatron-core dist checkpoints (``torch_dist``, ours and Megatron-LM's) are read through torch
  DCP's public ``StorageReader`` / ``LoadPlanner`` interfaces with a planner that asks for one
  layer's slice of each stacked ``decoder.layers.*`` tensor: no model, no process group, and
  only the ``.distcp`` byte ranges of that layer are read;
- Megatron-LM legacy checkpoints (``mp_rank_XX[_YYY]/model_optim_rng.pt``) are memory-mapped
  and merged per tensor over TP ranks and PP stages;
- DeepSpeed ZeRO checkpoints go through DeepSpeed's own reader.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from post_training.io import layout as cio
from post_training.checkpointing.tools import consolidate_mcore as mc
from post_training.checkpointing.tools.safe_load import safe_torch_load, unsafe_globals
from post_training.utils import UsageError, warn_rank_0

Tensor = torch.Tensor
_MP_RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_SKIP = ("optimizer.", "rng_state", "opt_param_scheduler")


@dataclass
class Plan:
    """What to write: HF tensors (names, shapes, stored dtypes) in order and how to get them."""

    kind: str
    config: dict  # HF config.json
    hf_dir: Path | None  # tokenizer / generation config files, when the checkpoint has them
    specs: list[tuple[str, tuple[int, ...], torch.dtype]]
    tensors: Callable[[], Iterator[tuple[str, Tensor]]]


def expected_params(config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the HF model for ``config`` (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = AutoConfig.for_model(config["model_type"], **kw)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (KeyError, ValueError) as e:
        raise UsageError(f"cannot build the HF model of this config: {e}") from None
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head is left out


def _read_config(d: Path) -> dict:
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read {d / 'config.json'}: {e}") from None


def _mcore_plan(kind: str, config: dict, hf_dir: Path | None, has: Callable[[str], bool],
                dtype_of: Callable[[mc.Unit], torch.dtype], read: Callable[[list[mc.Unit]], list[Tensor]],
                stored: set[str], used: Callable[[list[mc.Unit]], set[str]]) -> Plan:
    cfg_obj = argparse.Namespace(**config)
    units = mc.plan_units(mc.Dims.from_hf(cfg_obj), has)
    expect = expected_params(config)
    names = [n for u in units for n in u.hf]
    given = set(names)
    if extra := [n for n in names if n not in expect]:
        raise UsageError(f"{config.get('architectures')} has no parameter {extra[0]}: the checkpoint does not "
                         f"match its config")
    if missing := [n for n in expect if n not in given]:
        raise UsageError(f"the checkpoint gives no value for {', '.join(missing[:4])}")
    if skipped := sorted(stored - used(units)):
        warn_rank_0(f"{len(skipped)} checkpoint tensor(s) have no HF counterpart and are left out: "
                    f"{', '.join(skipped[:6])}")
    specs = [(n, expect[n], dtype_of(u)) for u in units for n in u.hf]
    return Plan(kind, config, hf_dir, specs, lambda: mc.stream(units, read))


def _hf_source(explicit: Path | None, saved: Path, args: dict | None, what: Path) -> tuple[dict, Path | None]:
    """Config (and tokenizer dir): --hf-config, else the checkpoint's hf_config/, else its args."""
    for d in (explicit, saved):
        if d is not None and (d / "config.json").is_file():
            return _read_config(d), d
    if explicit is not None:
        raise UsageError(f"--hf-config {explicit} has no config.json")
    if args:
        warn_rank_0(f"{what}: no HF config; built one from the checkpoint's args (no tokenizer is "
                    "written: pass --hf-config DIR with the model's config and tokenizer)")
        return mc.hf_config_from_args(args), None
    raise UsageError(f"{what} has no {cio.HF_CONFIG_DIR}/ and no args: pass --hf-config DIR "
                     "(the HF model's config.json and tokenizer)")


def _args_dict(args: Any) -> dict | None:
    if args is None:
        return None
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)


def _load_pickle(path: Path, trust_pickle: bool) -> Any:
    # Megatron-LM pickles its argparse.Namespace. Allowing that one class adds no code path: the
    # weights-only unpickler creates it with __new__ and sets attributes; any other global inside
    # it (an enum, a function) is still refused and named, and then needs --trust-pickle.
    return safe_torch_load(path, trust_pickle=trust_pickle, allow=[argparse.Namespace])


def refuse_quantized(modes: list[str], where: Path, lora: bool = False) -> None:
    """Refuse ModelOpt state plain weights cannot carry; LoRA (``peft``) only when merging it."""
    if "peft" in modes and not lora:
        raise UsageError(f"{where} holds unmerged LoRA adapters (ModelOpt modes: {', '.join(modes)}); "
                         f"consolidate would silently drop them: fold them in with "
                         f"python -m post_training.ckpt merge-lora {where} OUT")
    if lora and "peft" not in modes:
        raise UsageError(f"{where} has no LoRA adapter (ModelOpt modes: {', '.join(modes) or 'none'}): "
                         "nothing to merge; consolidate writes it as an HF model")
    quant = [m for m in modes if "quant" in m]
    if quant:
        raise UsageError(
            f"{where} is a quantized checkpoint (ModelOpt modes: {', '.join(modes)}); consolidate writes "
            f"plain weights and would silently drop the quantization: export it with scripts/export.sh "
            f"(MLM_MODEL_CKPT={where} EXPORT_DIR=OUT bash scripts/export.sh)")


# ----------------------------------------------------------------------------- dist checkpoints


def is_dist(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "metadata.json").is_file()


def _check_storage(iter_dir: Path, md) -> None:
    """Every byte range the DCP metadata names exists: a missing or short ``.distcp`` file is
    reported before any output is written."""
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        p = iter_dir / rel
        if not p.is_file():
            raise UsageError(f"checkpoint {iter_dir} is incomplete: shard {rel} is missing")
        if p.stat().st_size < size:
            raise UsageError(f"checkpoint shard {p} is truncated: {p.stat().st_size} bytes, "
                             f"the metadata needs {size}")


class _RegionPlanner:
    """The part of DCP's ``LoadPlanner`` protocol that ``FileSystemReader.read_data`` calls:
    fill given regions of stored tensors into given buffers (``dcp.load`` itself would re-read
    ``.metadata`` and want whole tensors or a ShardedTensor/DTensor with a process group)."""

    def __init__(self, md, requests: dict[str, tuple[tuple[int, ...], Tensor]]):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        self.dest = {fqn: buf for fqn, (_, buf) in requests.items()}
        self.items = []
        for fqn, (offsets, buf) in requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            self.items += create_read_items_for_chunk_list(fqn, md.state_dict_metadata[fqn], [chunk])

    def resolve_tensor(self, item) -> Tensor:
        t = self.dest[item.dest_index.fqn]
        for dim, (off, n) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, off, n)
        return t

    def commit_tensor(self, item, tensor: Tensor) -> None:
        pass  # resolve_tensor returned a view of the buffer: the data is already in place

    def load_bytes(self, item, value) -> None:
        raise AssertionError("only tensors are requested")


def open_dist(iter_dir: Path, hf_config: Path | None, trust_pickle: bool, lora: bool = False) -> Plan:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan

    backend = json.loads((iter_dir / "metadata.json").read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise UsageError(f"{iter_dir} is a {backend!r} dist checkpoint; only torch_dist is supported")
    meta = cio.read_meta(iter_dir)
    cio.verify_files(iter_dir, meta, hashes=False)
    modes, state = list(meta.get("modelopt_modes") or []), None
    if (iter_dir / "modelopt_state" / "common.pt").is_file():
        state = _load_pickle(iter_dir / "modelopt_state" / "common.pt", trust_pickle)
        modes += [m for m, _ in state.get("modelopt_state_dict", []) if m not in modes]
    where = iter_dir.parent if cio.is_checkpoint_root(iter_dir.parent) else iter_dir
    refuse_quantized(modes, where, lora)
    reader = FileSystemReader(str(iter_dir))
    try:
        md = reader.read_metadata()
    except Exception as e:
        raise UsageError(f"cannot read {iter_dir / '.metadata'}: {type(e).__name__}: {e}") from None
    _check_storage(iter_dir, md)
    reader.set_up_storage_reader(md, True)
    stored = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    args = None
    if hf_config is None and not (iter_dir.parent / cio.HF_CONFIG_DIR).is_dir():
        args = _args_dict(_load_pickle(iter_dir / "common.pt", trust_pickle).get("args"))
    config, hf_dir = _hf_source(hf_config, iter_dir.parent / cio.HF_CONFIG_DIR, args, iter_dir)
    layers = config["num_hidden_layers"]

    def key(u: mc.Unit) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        if u.layer is None:
            return u.mcore, (0,) * len(stored[u.mcore].size), tuple(stored[u.mcore].size)
        stacked = mc.LAYER_PREFIX + u.mcore
        if stacked in stored:  # [layers, ...]: one layer's slice
            size = tuple(stored[stacked].size)
            if size[0] != layers:
                raise UsageError(f"{stacked} has {size[0]} layers, the config {layers}")
            return stacked, (u.layer,) + (0,) * (len(size) - 1), (1,) + size[1:]
        fqn = f"{mc.LAYER_PREFIX}{u.layer}.{u.mcore}"  # non-homogeneous layers: one key each
        return fqn, (0,) * len(stored[fqn].size), tuple(stored[fqn].size)

    def has(name: str) -> bool:
        return name in stored or mc.LAYER_PREFIX + name in stored or f"{mc.LAYER_PREFIX}0.{name}" in stored

    def read_raw(units: list[mc.Unit]) -> list[Tensor]:
        requests = {}
        for u in units:
            fqn, offsets, sizes = key(u)
            requests[fqn] = (offsets, torch.empty(sizes, dtype=stored[fqn].properties.dtype))
        planner = _RegionPlanner(md, requests)
        try:
            plan = reader.prepare_local_plan(LoadPlan(planner.items))
            reader.read_data(plan, planner).wait()
        except Exception as e:  # a shard altered after the size check, unreadable bytes, ...
            raise UsageError(f"could not read checkpoint {iter_dir}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from None
        return [buf[0] if u.layer is not None and mc.LAYER_PREFIX + u.mcore in stored else buf
                for u, (_, buf) in zip(units, requests.values())]

    model_keys = {k for k in stored if not k.startswith(_SKIP)}
    read, folder = read_raw, None
    if lora:  # fold each adapted weight's LoRA update in as the weight is read
        from post_training.checkpointing.tools.consolidate_lora import Folder, peft_configs

        folder = Folder(peft_configs(state), model_keys, has, where)
        read = folder.wrap(read_raw)

    def used(units: list[mc.Unit]) -> set[str]:
        keys = {key(u)[0] for u in (folder.with_lora(units) if folder else units)}
        if folder:
            folder.check_used(keys)
        return keys

    par = meta.get("parallel", {})
    kind = f"megatron-core dist checkpoint (saved at TP={par.get('tp', '?')} PP={par.get('pp', '?')})"
    if folder:
        kind += f" with LoRA adapter(s) {', '.join(folder.names)} folded in"
    return _mcore_plan(kind, config, hf_dir, has, lambda u: stored[key(u)[0]].properties.dtype, read,
                       model_keys, used)


# ----------------------------------------------------------------------------- legacy checkpoints


def legacy_iter_dir(path: Path) -> Path | None:
    """The iteration directory of a Megatron-LM legacy checkpoint (root or iteration dir)."""
    it = cio.read_tracker(path) if cio.is_checkpoint_root(path) else path
    if any(_MP_RANK.match(p.name) and (p / "model_optim_rng.pt").is_file() for p in it.iterdir() if p.is_dir()):
        return it
    return None


def open_legacy(iter_dir: Path, hf_config: Path | None, trust_pickle: bool) -> Plan:
    ranks = {}
    for p in iter_dir.iterdir():
        if (m := _MP_RANK.match(p.name)) and p.is_dir():
            ranks[(int(m.group(2) or 0), int(m.group(1)))] = p / "model_optim_rng.pt"
    pp, tp = max(k[0] for k in ranks) + 1, max(k[1] for k in ranks) + 1
    if missing := [f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") for s in range(pp) for t in range(tp)
                   if not ranks.get((s, t), Path("/nonexistent")).is_file()]:
        raise UsageError(f"legacy checkpoint {iter_dir} is incomplete: {', '.join(missing)} missing "
                         f"(TP={tp} PP={pp})")
    # Memory-mapped: a tensor is read when it is merged, so all shards can stay open.
    loaded = {k: _load_pickle(f, trust_pickle) for k, f in sorted(ranks.items())}
    first = loaded[(0, 0)]
    if "model" not in first:
        vpp = sorted(k for k in first if re.fullmatch(r"model\d+", str(k)))
        raise UsageError(f"{ranks[(0, 0)]} has no 'model' entry" +
                         (" (virtual pipeline stages are not supported)" if vpp else ""))
    refuse_quantized([m for m, _ in (first.get("modelopt_state") or {}).get("modelopt_state_dict", [])],
                     iter_dir)
    sds = [[loaded[(s, t)]["model"] for t in range(tp)] for s in range(pp)]
    # Each stage numbers its layers from 0: global index = layers of the stages before + local.
    where: dict[int, tuple[int, int]] = {}
    for s in range(pp):
        local = sorted({int(k.split(".")[2]) for k in sds[s][0] if k.startswith(mc.LAYER_PREFIX)})
        for j in local:
            where[len(where)] = (s, j)
    args = _args_dict(first.get("args"))
    config, hf_dir = _hf_source(hf_config, iter_dir.parent / cio.HF_CONFIG_DIR, args, iter_dir)
    if len(where) != config["num_hidden_layers"]:
        raise UsageError(f"legacy checkpoint {iter_dir} has {len(where)} layers, the config "
                         f"{config['num_hidden_layers']}")

    def locate(u: mc.Unit) -> tuple[int, str]:
        if u.layer is not None:
            s, j = where[u.layer]
            return s, f"{mc.LAYER_PREFIX}{j}.{u.mcore}"
        # The embedding lives on the first stage; norm and output layer on the last.
        return (0 if u.mcore.startswith("embedding") else pp - 1), u.mcore

    def has(name: str) -> bool:
        s0, j0 = where.get(0, (0, 0))
        return name in sds[0][0] or name in sds[-1][0] or f"{mc.LAYER_PREFIX}{j0}.{name}" in sds[s0][0]

    def read(units: list[mc.Unit]) -> list[Tensor]:
        out = []
        for u in units:
            s, k = locate(u)
            out.append(mc.merge_tp(k, [sds[s][t][k] for t in range(tp)]))
        return out

    def used(units: list[mc.Unit]) -> set[str]:
        return {f"{s}:{k}" for s, k in map(locate, units)}

    stored = {f"{s}:{k}" for s in range(pp) for k in sds[s][0] if not k.endswith("_extra_state")
              and not (s == pp - 1 and pp > 1 and k == "output_layer.weight" and config.get("tie_word_embeddings"))}
    kind = f"Megatron-LM legacy checkpoint (TP={tp} PP={pp})"
    return _mcore_plan(kind, config, hf_dir, has, lambda u: sds[locate(u)[0]][0][locate(u)[1]].dtype, read,
                       stored, used)


# ----------------------------------------------------------------------------- DeepSpeed ZeRO


def zero_tag_dir(path: Path) -> Path | None:
    """The ``global_stepN`` directory of a ZeRO checkpoint (given its parent or itself)."""
    if (path / "latest").is_file():
        tag = path / (path / "latest").read_text().strip()
        if not tag.is_dir():
            raise UsageError(f"{path / 'latest'} names {tag.name}, which is not in {path}")
        return tag
    return path if any(path.glob("*_optim_states.pt")) else None


def open_zero(tag_dir: Path, hf_config: Path | None, trust_pickle: bool) -> Plan:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except Exception as e:  # ImportError, or deepspeed failing to find an accelerator
        raise UsageError(f"{tag_dir} is a DeepSpeed ZeRO checkpoint: reading it needs deepspeed, which "
                         f"could not be imported ({type(e).__name__}: {e}); install it with "
                         "DS_BUILD_OPS=0 pip install deepspeed (no CUDA needed)") from None
    # DeepSpeed's reader unpickles with weights_only=False: check what the files would run first.
    names = sorted({g for f in sorted(tag_dir.glob("*.pt")) for g in unsafe_globals(f)})
    if names and not trust_pickle:
        raise UsageError(f"{tag_dir}: DeepSpeed's reader loads these files with full pickle, and they "
                         f"reference {', '.join(names)}; pass --trust-pickle only if you trust where "
                         "the checkpoint came from")
    config, hf_dir = _hf_source(hf_config, tag_dir.parent, None, tag_dir)
    expect = expected_params(config)
    try:  # lazy: ZeRO-3 parameters are gathered one at a time (ZeRO-1/2 merge their flat groups)
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not our output
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                          lazy_mode=True)
    except Exception as e:
        raise UsageError(f"DeepSpeed could not read {tag_dir}: {type(e).__name__}: {e}") from None
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if missing := [n for n in expect if n not in sd]:
        raise UsageError(f"{tag_dir} has no {', '.join(missing[:4])}: not a {config['architectures'][0]} "
                         "with Hugging Face parameter names")
    if skipped := [k for k in sd if k not in expect and k != "lm_head.weight"]:
        warn_rank_0(f"{len(skipped)} tensor(s) not in the HF model are left out: {', '.join(skipped[:6])}")
    for n, shape in expect.items():
        if tuple(sd[n].shape) != shape:
            raise UsageError(f"{n} is {tuple(sd[n].shape)} in {tag_dir}, {shape} in the config")

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for n in expect:
            yield n, sd[n].contiguous()  # GatheredTensor -> tensor

    # The fp32 master weights are what ZeRO keeps: "keep" writes fp32.
    specs = [(n, shape, torch.float32) for n, shape in expect.items()]
    return Plan("DeepSpeed ZeRO checkpoint", config, hf_dir, specs, tensors)
