"""``merge-lora BASE ADAPTER OUT``: fold a PEFT LoRA adapter into its Hugging Face base model;
``merge-lora CKPT OUT``: fold the LoRA adapters of a toolkit dist checkpoint into an HF model.

For each adapted module ``W' = W + s * B @ A`` (transposed for Conv1D layers, which store
``(in, out)``, and for embeddings), computed in fp32 and cast once to the output dtype; ``s = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA, with ``r`` and ``alpha`` from ``rank_pattern`` / ``alpha_pattern``
when a pattern matches the module (as peft matches them). Full tensors saved in the adapter are
loaded over the base first, as peft does: biases (``bias="all"`` / ``"lora_only"``) and
``modules_to_save`` copies; ``lora_bias`` adds ``s * lora_B.bias`` to the base bias.

Tied embeddings: a LoRA update of ``lm_head`` in a base that ties it changes the shared tensor
(as merging into peft's shared parameter does); a ``modules_to_save`` copy of one side unties
the pair (``tie_word_embeddings: false``), since peft trained a separate copy.

The base is streamed shard by shard; the output keeps the base's sharding and its other files.

A dist checkpoint with ModelOpt LoRA adapters (``peft`` mode, any TP/PP; ADAPTER omitted or the
checkpoint itself) goes through ``consolidate``'s streaming reader, which reads global tensors, so
the TP split of lora A / B needs no handling: ``W + scale * B @ A`` is folded into each megatron
weight in fp32 before the megatron -> HF split and cast once when written
(:mod:`post_training.checkpointing.tools.consolidate_lora`). A dist-checkpoint BASE with a separate PEFT adapter
is refused with the export step to run first.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from post_training.checkpointing.tools.to_safetensors import (BIN_INDEX, EMBED_SUFFIXES, index_files,
                                                              load_torch_file, read_config, read_json,
                                                              untie_shared)
from post_training.io.formats import DTYPES
from post_training.io.safetensors_io import INDEX
from post_training.utils import UsageError, warn_rank_0

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
# LoraConfig fields whose non-default values change what merging means; refused by name.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales every merged column by a learned magnitude",
    "layer_replication": "it duplicates base layers",
    "target_parameters": "it adapts raw nn.Parameters (MoE experts)",
    "trainable_token_indices": "it trains single embedding rows",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens; it cannot be merged",
    "use_qalora": "QALoRA's update is pooled over quantization groups",
    "use_bdlora": "block-diagonal LoRA factors are stored in another layout",
    "arrow_config": "Arrow routes between several adapters at inference",
}
# transformers models built from Conv1D (weights stored (in, out)) and the names of those layers.
_CONV1D_FAMILIES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp")
_CONV1D_NAMES = ("c_attn", "q_attn", "c_proj", "c_fc")
# init_lora_weights values that rewrite the base weights when the adapter is created.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraUpdate:
    """One adapted module: ``delta = scale * B @ A`` (``transpose``d to the base weight's layout)."""

    module: str
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True)
    embedding: bool = False  # lora_embedding_A/B: stored transposed to the (num, dim) weight
    transpose: bool = False
    scale: float = 1.0

    def delta(self) -> torch.Tensor:
        d = self.B.float() @ self.A.float()
        return (d.T if self.transpose else d) * self.scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", metavar="BASE", help="HF model directory (safetensors or .bin, sharded or not), "
                        "or a toolkit dist checkpoint trained with LoRA (root or iteration dir)")
    parser.add_argument("adapter", metavar="ADAPTER", nargs="?", default=None,
                        help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors/.bin); "
                             "omit it (or repeat BASE) when BASE is a dist checkpoint with LoRA adapters")
    parser.add_argument("output", metavar="OUT", help="output HF directory (safetensors, the base's sharding)")
    parser.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                        help="dtype of the floating-point output tensors (default: each base tensor's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's rank/alpha pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def read_adapter(adapter: Path) -> tuple[dict, dict[str, LoraUpdate], dict[str, torch.Tensor]]:
    """adapter_config.json and weights -> (config, LoRA updates by module, full tensors by
    adapter-relative name)."""
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{adapter}: no adapter_config.json (is this a PEFT adapter directory?)")
    cfg = read_json(cfg_path)
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise UsageError(f"{adapter} is a {kind} adapter; merge-lora merges LoRA adapters only")
    for field, why in _UNSUPPORTED.items():
        if cfg.get(field):
            raise UsageError(f"{adapter}: {field} is set, which merge-lora does not support ({why}); "
                             "merge it with peft's merge_and_unload() instead")
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise UsageError(f"{adapter}: unknown bias setting {cfg.get('bias')!r}")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        warn_rank_0(f"{adapter}: init_lora_weights={init}: this init rewrites the base weights, so BASE must "
                    "be the residual model saved with the adapter, not the original one")

    weights = _load_adapter_weights(adapter)
    updates: dict[str, LoraUpdate] = {}
    full: dict[str, torch.Tensor] = {}
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
             ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
    for key, t in weights.items():
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in parts if name.endswith(s)), None)
        if suffix is None:
            if ".lora_" in name or "lora_magnitude_vector" in name:
                raise UsageError(f"{adapter}: adapter tensor {key} is of a kind merge-lora does not know")
            full[name] = t
            continue
        module = name[: -len(suffix)]
        up = updates.setdefault(module, LoraUpdate(module))
        setattr(up, parts[suffix], t)
        up.embedding = "embedding" in suffix
    for module, up in updates.items():
        if up.A is None or up.B is None:
            raise UsageError(f"{adapter}: {module} has only one of lora_A / lora_B")
        if up.A.dim() != 2 or up.B.dim() != 2 or up.B.shape[1] != up.A.shape[0]:
            raise UsageError(f"{adapter}: {module} lora_A {list(up.A.shape)} and lora_B {list(up.B.shape)} "
                             "are not a rank-r pair (conv LoRA is not supported)")
        r = int(pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)))
        alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        if up.A.shape[0] != r:
            raise UsageError(f"{adapter}: adapter_config gives {module} rank {r} but its lora_A has rank "
                             f"{up.A.shape[0]}")
        up.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    if not updates and not full:
        raise UsageError(f"{adapter}: the adapter holds no tensors")
    return cfg, updates, full


def _load_adapter_weights(adapter: Path) -> dict[str, torch.Tensor]:
    import torch

    if (adapter / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(adapter / "adapter_model.safetensors")
    if (adapter / "adapter_model.bin").is_file():
        sd = load_torch_file(adapter / "adapter_model.bin")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UsageError(f"{adapter / 'adapter_model.bin'} is not a flat dict of tensors")
        return sd
    raise UsageError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin")


def base_files(base: Path) -> list[Path]:
    """The base's weight files in shard order; refuses quantized bases and dist checkpoints."""
    from post_training.io.layout import TRACKER

    if not base.is_dir():
        raise UsageError(f"BASE {base} is not a directory (give the HF model directory)")
    cfg = read_config(base)
    if "quantization_config" in cfg or (base / "hf_quant_config.json").is_file():
        method = (cfg.get("quantization_config") or {}).get("quant_method", "see hf_quant_config.json")
        raise UsageError(f"BASE {base} is quantized ({method}): a LoRA update cannot be added to quantized "
                         "weights without changing them; dequantize the base, merge, requantize instead")
    for index in (INDEX, BIN_INDEX):
        if (base / index).is_file():
            return index_files(base / index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (base / single).is_file():
            return [base / single]
    if (base / TRACKER).is_file() or ((base / "metadata.json").is_file() and (base / "common.pt").is_file()):
        raise UsageError(f"BASE {base} is a Megatron distributed checkpoint; export it to a Hugging Face "
                         "directory first (scripts/export.sh) and merge into that (LoRA adapters saved in "
                         "the checkpoint itself: merge-lora CKPT OUT)")
    raise UsageError(f"BASE {base} has no model.safetensors, pytorch_model.bin or weight index")


def load_shard(path: Path, drop_tied: bool) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    sd = load_torch_file(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} is not a flat state dict of tensors")
    return untie_shared(sd, drop_tied)[0]  # a tied lm_head shares storage in .bin files


def shard_shapes(path: Path, drop_tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a shard without reading the tensors (header / memory map)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(t.shape) for k, t in load_shard(path, drop_tied).items()}


@dataclass
class Plan:
    """What happens to each base tensor."""

    updates: dict[str, LoraUpdate]  # base key -> LoRA update
    replace: dict[str, torch.Tensor]  # base key -> tensor loaded over it first
    add: dict[str, tuple[str, torch.Tensor | None]]  # new key -> (written after base key, tensor or None: a copy)
    bias: dict[str, LoraUpdate]  # base bias key -> update whose lora_B.bias is added
    drop: set[str]  # base keys not written
    untie: bool = False


def transposed_layout(up: LoraUpdate, base_shape: tuple[int, ...], cfg: dict, base_cfg: dict) -> bool:
    """Whether the base stores this weight as (in, out). peft decides by layer type (Conv1D: yes,
    nn.Linear: no, overriding ``fan_in_fan_out`` with a warning); here the base shape decides when
    the weight is not square, the architecture when it is a transformers model, else the config."""
    if up.embedding:
        return True
    straight = (up.B.shape[0], up.A.shape[1])
    if straight[0] != straight[1] and tuple(base_shape) in (straight, straight[::-1]):
        return tuple(base_shape) != straight
    if "auto_map" not in base_cfg:  # a transformers architecture: its layer types are known
        return base_cfg.get("model_type") in _CONV1D_FAMILIES and up.module.rsplit(".", 1)[-1] in _CONV1D_NAMES
    return bool(cfg.get("fan_in_fan_out"))


def make_plan(cfg: dict, updates: dict[str, LoraUpdate], full: dict[str, torch.Tensor],
              shapes: dict[str, tuple[int, ...]], base_cfg: dict) -> Plan:
    """Map every adapter entry to a base tensor and check shapes, before anything is written."""
    # transformers re-ties lm_head to the input embedding unless the config unties it.
    tied = base_cfg.get("tie_word_embeddings", True) is not False
    embed = next((k for k in shapes if k.endswith(EMBED_SUFFIXES)), None)
    tied = tied and embed is not None
    saved_modules = cfg.get("modules_to_save") or []
    plan = Plan({}, {}, {}, {}, set())
    if tied and "lm_head.weight" in shapes and base_cfg.get("tie_word_embeddings") is True:
        plan.drop.add("lm_head.weight")  # a stored copy transformers ignores: it re-ties on load

    def resolve(key: str) -> str:
        # peft merges into lm_head's weight, which is the embedding's parameter when tied.
        if tied and key == "lm_head.weight":
            return embed
        if key not in shapes:
            module = key.rsplit(".", 1)[0]
            raise UsageError(f"adapter targets {module}, which the base has no {key} for "
                             "(adapter trained on another model?)")
        return key

    for name, t in full.items():
        key = name.replace(".base_layer.", ".")
        module = key.rsplit(".", 1)[0]
        is_copy = ".base_layer." not in name and any(re.fullmatch(rf"(.*\.)?{re.escape(m)}", module)
                                                      for m in saved_modules)
        if tied and is_copy and key in ("lm_head.weight", embed):
            # peft trained a separate copy of one side of the tied pair: the pair comes apart.
            plan.untie = True
            if key == "lm_head.weight":
                plan.add["lm_head.weight"] = (embed, t)
                _check_shape(key, shapes[embed], t.shape, "the adapter's copy")
                continue
            plan.add["lm_head.weight"] = (embed, None)
        base_key = resolve(key)
        _check_shape(base_key, shapes[base_key], t.shape, "the adapter's copy")
        if base_key in plan.replace and not _equal(plan.replace[base_key], t):
            raise UsageError(f"adapter holds two different values for {base_key}")
        plan.replace[base_key] = t
    for module, up in updates.items():
        base_key = resolve(f"{module}.weight")
        if base_key in plan.updates:
            raise UsageError(f"adapter updates {base_key} twice (through {module} and "
                             f"{plan.updates[base_key].module})")
        up.transpose = transposed_layout(up, shapes[base_key], cfg, base_cfg)
        delta_shape = (up.A.shape[1], up.B.shape[0]) if up.transpose else (up.B.shape[0], up.A.shape[1])
        _check_shape(base_key, shapes[base_key], delta_shape,
                     f"the LoRA update (lora_A {list(up.A.shape)}, lora_B {list(up.B.shape)})")
        if up.bias is not None:
            bias_key = f"{module}.bias"
            if bias_key not in shapes:
                raise UsageError(f"adapter has lora_B.bias for {module}, but the base has no {bias_key}")
            _check_shape(bias_key, shapes[bias_key], up.bias.shape, "the adapter's lora_B.bias")
            plan.bias[bias_key] = up
        plan.updates[base_key] = up
    return plan


def _check_shape(key: str, base_shape, shape, what: str) -> None:
    if tuple(base_shape) != tuple(shape):
        raise UsageError(f"adapter does not fit BASE: {key} is {list(base_shape)} in BASE but {what} is "
                         f"{list(shape)} (adapter trained on another model?)")


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a.float(), b.float())


def merge_tensor(key: str, t: torch.Tensor, plan: Plan, out_dtype: torch.dtype | None) -> torch.Tensor:
    """One output tensor: adapter copy over the base, then the LoRA update, cast once."""
    dtype = out_dtype if out_dtype is not None and t.is_floating_point() else t.dtype
    src = plan.replace.get(key, t)
    up, bup = plan.updates.get(key), plan.bias.get(key)
    if up is None and bup is None:
        return src.to(dtype)
    merged = src.float()
    if up is not None:
        merged = merged + up.delta()
    if bup is not None:
        merged = merged + bup.scale * bup.bias.float()
    return merged.to(dtype)


def merge_dist(ckpt: Path, out: Path, dtype: str, overwrite: bool) -> int:
    """``merge-lora CKPT OUT``: the checkpoint's LoRA adapters folded in, written as an HF model."""
    from post_training.io import layout as cio
    from post_training.checkpointing.tools.consolidate import consolidate_to_hf

    if out.resolve() == ckpt.resolve():
        raise UsageError("OUT must not be CKPT itself")
    if not ckpt.is_dir() or not (cio.is_checkpoint_root(ckpt) or cio.is_dist_checkpoint_dir(ckpt)):
        raise UsageError(f"{ckpt} is not a dist checkpoint: without ADAPTER, merge-lora folds the LoRA "
                         "adapters of a toolkit dist checkpoint (HF model: merge-lora BASE ADAPTER OUT)")
    consolidate_to_hf(ckpt, out, dtype, overwrite=overwrite, lora=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from post_training.checkpointing.tools.safe_load import write_sha256sums
    from post_training.io.atomic import check_output_dir, staged_dir
    from post_training.io.formats import torch_dtype
    from post_training.io.hf_files import copy_aux_files, update_config
    from post_training.io.safetensors_io import ShardWriter

    base = Path(args.base)
    if args.adapter is None or Path(args.adapter).resolve() == base.resolve():
        return merge_dist(base, Path(args.output), args.dtype, args.overwrite)
    adapter = Path(args.adapter)
    if Path(args.output).resolve() in (base.resolve(), adapter.resolve()):
        raise UsageError("OUT must not be BASE or ADAPTER itself")
    check_output_dir(args.output, args.overwrite)  # refuse before reading any weights
    files = base_files(base)
    if not adapter.is_dir():
        raise UsageError(f"ADAPTER {adapter} is not a directory")
    cfg, updates, full = read_adapter(adapter)
    base_cfg = read_config(base)
    tied = base_cfg.get("tie_word_embeddings", True) is not False
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(shard_shapes(f, tied))
    plan = make_plan(cfg, updates, full, shapes, base_cfg)
    dtype = torch_dtype(args.dtype)

    with staged_dir(args.output, args.overwrite) as root:
        writer = ShardWriter(root)
        for f in files:  # one base shard in memory at a time
            for key, t in load_shard(f, tied).items():
                if key in plan.drop:
                    continue
                writer.add(key, merge_tensor(key, t, plan, dtype))
                for new_key, (beside, tensor) in plan.add.items():
                    if beside == key:  # the untied side goes into the same shard as its partner
                        src = t if tensor is None else tensor
                        writer.add(new_key, src.to(dtype if dtype is not None else t.dtype))
            writer.next_shard()
        names = writer.finish()
        copy_aux_files(base, root)
        update_config(root, dtype, **({"tie_word_embeddings": False} if plan.untie else {}))
        write_sha256sums(root)
    print(f"merged {len(plan.updates)} LoRA update(s) and {len(plan.replace)} saved tensor(s) from {adapter} "
          f"into {base}: {len(names)} file(s) in {args.output}" + ("; lm_head untied" if plan.untie else ""))
    return 0
