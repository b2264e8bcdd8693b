"""LoRA adapters of a toolkit dist checkpoint (ModelOpt ``peft`` mode), folded into the base
weights while ``merge-lora CKPT OUT`` streams them through the consolidate machinery.

Each adapted megatron linear ``M`` stores ``M.lora_a_<name>.weight`` (rank, in) and
``M.lora_b_<name>.weight`` (out, rank) beside ``M.weight``; the update is ``W + scale * B @ A``,
computed in fp32 and cast once (when the tensor is written). The scale is not a tensor: it comes
from the ``peft`` config in ``modelopt_state/`` (``adapter_cfg`` patterns matched against the
module name as ModelOpt matches them, later patterns overriding earlier ones).

TP needs no handling: DCP stores global tensors. ModelOpt's column-parallel LoRA (``linear_qkv``,
``linear_fc1``, ``output_layer``) keeps A replicated and splits B on its output rows; the
row-parallel one (``linear_proj``, ``linear_fc2``) splits A on its input columns and keeps B
replicated, and either way the global B @ A has the rows and columns of the global W. The fold is
done on the megatron weight, before the megatron -> HF split (qkv groups, fc1 gate/up), so B's rows
must be in W's row order: they are for ``linear_fc1`` because the toolkit saves its lora_b in the
SwiGLU layout of the weight (:func:`post_training.checkpointing.load.model_sharded_state_dict`).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable

import torch

from post_training.checkpointing.tools import consolidate_mcore as mc
from post_training.utils import UsageError

Tensor = torch.Tensor
_LORA = re.compile(r"\.lora_([ab])_([^.]+)\.weight$")


def peft_configs(state: dict | None) -> dict[str, dict]:
    """Adapter name -> ``adapter_cfg`` of each ``peft`` mode in a ModelOpt state."""
    out = {}
    for mode, st in (state or {}).get("modelopt_state_dict", []):
        if mode == "peft":
            cfg = (st or {}).get("config", {})
            out[cfg.get("adapter_name", "default")] = dict(cfg.get("adapter_cfg") or {})
    return out


def resolve(module: str, adapter_cfg: dict) -> dict | None:
    """The merged attributes of the patterns matching ``module`` (None: no pattern matches)."""
    merged = None
    for pattern, setting in adapter_cfg.items():
        if isinstance(pattern, str) and fnmatch.fnmatch(module, pattern):
            merged = {**(merged or {}), **dict(setting)}
    return merged


class Folder:
    """Adds the LoRA tensors of each unit to the reads and folds them into the unit's weight."""

    def __init__(self, configs: dict[str, dict], stored: set[str], has: Callable[[str], bool], where):
        self.configs, self.has, self.where = configs, has, where
        self.lora_keys = {k for k in stored if _LORA.search(k)}
        self.names = sorted({_LORA.search(k).group(2) for k in self.lora_keys})
        if not self.names:
            raise UsageError(f"{where} has ModelOpt peft state but no LoRA tensors: nothing to merge "
                             "(consolidate writes it as it is)")
        if unknown := [n for n in self.names if n not in configs]:
            raise UsageError(f"{where} holds LoRA adapter {unknown[0]!r}, which its ModelOpt state has no "
                             f"peft config for (its scale is unknown)")
        self.folded = 0

    def pairs(self, u: mc.Unit) -> list[tuple[mc.Unit, mc.Unit, float]]:
        if not u.mcore.endswith(".weight"):
            return []
        module = u.mcore[: -len(".weight")]
        full = f"{mc.LAYER_PREFIX}{u.layer}.{module}" if u.layer is not None else module
        out = []
        for name in self.names:
            a, b = f"{module}.lora_a_{name}.weight", f"{module}.lora_b_{name}.weight"
            if not (self.has(a) or self.has(b)):
                continue
            if not (self.has(a) and self.has(b)):
                raise UsageError(f"{self.where}: {full} has only one of lora_a_{name} / lora_b_{name}")
            attrs = resolve(full, self.configs[name])
            if not attrs or attrs.get("enable") is False:
                raise UsageError(f"{self.where}: {full} has LoRA adapter {name!r} tensors, but its peft "
                                 "config does not enable that adapter there")
            out.append((mc.Unit(a, u.layer, (), mc._same), mc.Unit(b, u.layer, (), mc._same),
                        float(attrs.get("scale", 1.0))))
        return out

    def with_lora(self, units: list[mc.Unit]) -> list[mc.Unit]:
        return units + [x for u in units for a, b, _ in self.pairs(u) for x in (a, b)]

    def check_used(self, used: set[str]) -> None:
        """Every stored LoRA tensor is folded somewhere (an unmerged adapter must not be dropped)."""
        if left := sorted(self.lora_keys - used):
            raise UsageError(f"{self.where}: LoRA tensor {left[0]} ({len(left)} in all) belongs to no weight "
                             "written to the HF model (e.g. output_layer with tied embeddings); "
                             "merge-lora cannot fold it")

    def wrap(self, read: Callable[[list[mc.Unit]], list[Tensor]]) -> Callable[[list[mc.Unit]], list[Tensor]]:
        def read_folded(units: list[mc.Unit]) -> list[Tensor]:
            pairs = [(i, p) for i, u in enumerate(units) for p in self.pairs(u)]
            got = read(units + [x for _, (a, b, _) in pairs for x in (a, b)])
            out, n = got[: len(units)], len(units)
            for j, (i, (ua, _, scale)) in enumerate(pairs):
                A, B = got[n + 2 * j].float(), got[n + 2 * j + 1].float()
                if A.dim() != 2 or B.dim() != 2 or (B.shape[0], A.shape[1]) != tuple(out[i].shape) \
                        or B.shape[1] != A.shape[0]:
                    raise UsageError(f"{self.where}: {ua.mcore} {list(A.shape)} and its lora_b {list(B.shape)} "
                                     f"do not fit {units[i].mcore} {list(out[i].shape)}")
                out[i] = out[i].float() + scale * (B @ A)  # fp32; cast once when written
                self.folded += 1
            return out

        return read_folded
