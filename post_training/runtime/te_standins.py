"""Transformer Engine stand-ins for ModelOpt's megatron speculative plugins (EAGLE) without TE.

ModelOpt 0.47's ``plugins/megatron_eagle.py`` is written against Transformer Engine. Without TE,
megatron-core's ``extensions.transformer_engine`` names are ``MagicMock`` placeholders (TELinear,
TEDotProductAttention) or raise on construction (TENorm, and ``Norm`` of megatron's ModelOpt
spec), so ``mtsp.convert(model, EAGLE3_DEFAULT_CFG)`` fails on CPU. Four patch registry entries
(:mod:`.patches`, group ``te_standins``), applied on demand -- by
:func:`post_training.speculative.heads.convert_model` and by a checkpoint load whose ModelOpt state
holds a speculative mode -- and only when TE is absent:

* ``te_norm_standin``: the plugin's ``TENorm`` (embedding norm ``enorm``/``hnorm``) and ``Norm``
  in ``get_gpt_modelopt_spec`` (the draft layer's norms) become megatron's ``WrappedTorchNorm``
  (``torch.nn.RMSNorm`` for the RMSNorm config the plugin builds).
* ``te_linear_standin``: the plugin's ``TELinear(parallel_mode="duplicated")`` (EAGLE-3's ``fc``,
  aux 3h -> h) becomes a full ``nn.Linear`` on every TP rank returning ``(out, None)``, TE's
  duplicated mode. Other parallel modes are refused (the plugin uses none).
* ``te_attention_standin``: ``TEDotProductAttention`` in ``get_gpt_modelopt_spec`` (the draft
  layer's core attention, built with ``AttnMaskType.arbitrary``) becomes the toolkit's SDPA
  attention, which applies a given boolean mask as the whole mask; it clones key and value
  first, because in training the plugin runs the draft layer with a static KV cache across the
  train-time-test steps: step i+1 writes its keys into the cache tensor whose slice step i's
  attention saved for backward ("modified by an inplace operation" otherwise; ModelOpt's own
  context-parallel TE wrapper clones for the same reason). The plugin's
  ``te_dot_product_attention_with_cp`` context reads ``TEDotProductAttention.forward`` (a mock
  has none) to swap it under context parallelism only; without CP it is a no-op context here.
* ``te_version_without_te``: ``Attention._adjust_key_value_for_inference`` calls
  ``is_te_min_version("2.2.0")`` when a training forward uses a KV cache (EAGLE's TTT steps),
  which compares ``None`` with a version without TE (TypeError). Without TE no version is met.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from post_training.runtime.dist import have_te
from post_training.runtime.patches import ON_DEMAND, AttrSwap, Patch, swaps

_EAGLE = "modelopt.torch.speculative.plugins.megatron_eagle"
_SPECS = "megatron.core.post_training.modelopt.gpt.model_specs"
_ATTN = "megatron.core.transformer.attention"
_NORM = "megatron.core.transformer.torch_norm:WrappedTorchNorm"

_CLASSES: dict[str, type] = {}


def norm_standin(_orig: Any = None) -> type:
    """TENorm / ModelOpt spec ``Norm``: megatron's torch norm (same constructor arguments)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def linear_standin(_orig: Any = None) -> type:
    """``TELinear`` in TE's "duplicated" mode: the full weight on every TP rank, no
    communication, ``forward`` returns ``(output, bias or None)`` like megatron's linears."""
    if "linear" not in _CLASSES:

        class DuplicatedLinear(torch.nn.Linear):
            def __init__(self, input_size: int, output_size: int, *, parallel_mode: str | None,
                         config, init_method=None, bias: bool = True, skip_bias_add: bool = False,
                         skip_weight_param_allocation: bool = False, **_unused) -> None:
                if parallel_mode != "duplicated" or skip_weight_param_allocation:
                    raise ValueError(f"TELinear stand-in: only parallel_mode='duplicated' with its own "
                                     f"weight is supported (got {parallel_mode!r})")
                super().__init__(input_size, output_size, bias=bias, dtype=config.params_dtype)
                # TE ignores the plugin's no-op init_method; megatron's init keeps TP ranks equal
                # (every rank draws the same numbers from the same seed).
                config.init_method(self.weight)
                if bias:
                    torch.nn.init.zeros_(self.bias)
                self.skip_bias_add = skip_bias_add

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
                if self.skip_bias_add:
                    return torch.nn.functional.linear(x, self.weight), self.bias
                return super().forward(x), None

        _CLASSES["linear"] = DuplicatedLinear
    return _CLASSES["linear"]


def attention_standin(_orig: Any = None) -> type:
    """``TEDotProductAttention`` of the ModelOpt spec: SDPA with arbitrary masks, key and value
    cloned (see the module docstring)."""
    if "attention" not in _CLASSES:
        from post_training.attention import SDPAttention

        class SDPAttentionClonedKV(SDPAttention):
            def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                        attention_bias=None, packed_seq_params=None):
                return super().forward(query, key.clone(), value.clone(), attention_mask,
                                       attn_mask_type, attention_bias, packed_seq_params)

        _CLASSES["attention"] = SDPAttentionClonedKV
    return _CLASSES["attention"]


def _cp_context(orig: Any):
    @contextlib.contextmanager
    def te_dot_product_attention_with_cp(attention_mask, num_attention_heads):
        from megatron.core.parallel_state import get_context_parallel_world_size

        if get_context_parallel_world_size() > 1:
            raise ValueError("EAGLE training with context parallelism needs Transformer Engine")
        yield

    return te_dot_product_attention_with_cp


def _te_min_version(orig: Any):
    def is_te_min_version(version, check_equality=True):
        return False if not have_te() else orig(version, check_equality)

    return is_te_min_version


_NORM_SWAPS = swaps(AttrSwap(f"{_EAGLE}:TENorm", norm_standin), AttrSwap(f"{_SPECS}:Norm", norm_standin))
_LINEAR_SWAPS = swaps(AttrSwap(f"{_EAGLE}:TELinear", linear_standin))
_ATTN_SWAPS = swaps(AttrSwap(f"{_SPECS}:TEDotProductAttention", attention_standin),
                    AttrSwap(f"{_EAGLE}:te_dot_product_attention_with_cp", _cp_context))
_VERSION_SWAPS = swaps(AttrSwap(f"{_ATTN}:is_te_min_version", _te_min_version))


def _importing(apply_remove):
    """The plugin module must be imported before its names can be swapped."""
    apply, remove = apply_remove

    def do_apply() -> None:
        import modelopt.torch.speculative  # noqa: F401  (imports the megatron plugins)

        apply()

    return do_apply, remove


_SPEC_SIG = ("(config: megatron.core.transformer.transformer_config.TransformerConfig, "
             "local_core_attention: bool = False, remap_te_layernorm: bool = False, "
             "real_quant_cfg: str = 'None', qk_l2_norm: bool = False, "
             "use_arbitrary_attention_mask: bool = False)")
_COVERS = ("mtsp.convert(model, EAGLE3_DEFAULT_CFG / eagle configs) and the EAGLE training forward, "
           "from post_training.speculative.heads.convert_model and a checkpoint load of a "
           "speculative ModelOpt state")

PATCHES = [
    Patch("te_norm_standin",
          {f"{_EAGLE}:TENorm": None,
           f"{_SPECS}:Norm": "(config: megatron.core.transformer.transformer_config.TransformerConfig, "
                             "hidden_size: int, eps: float = 1e-05)"},
          "TE shim: without Transformer Engine, megatron's TENorm and the ModelOpt spec's Norm raise "
          "on construction, so ModelOpt's EAGLE module (enorm, the draft layer's norms) cannot be "
          "built. Both become megatron's WrappedTorchNorm (torch RMSNorm)",
          ON_DEMAND, *_importing(_NORM_SWAPS), covers=_COVERS,
          depends={_NORM: "(config: megatron.core.transformer.transformer_config.TransformerConfig, "
                          "hidden_size: int, eps: float = 1e-05, persist_layer_norm: bool = False, "
                          "zero_centered_gamma: bool = False, normalization: str = 'LayerNorm')",
                   f"{_SPECS}:get_gpt_modelopt_spec": _SPEC_SIG},
          group="te_standins"),
    Patch("te_linear_standin", {f"{_EAGLE}:TELinear": None},
          "TE shim: ModelOpt's EAGLE-3 fc (aux hidden states 3h -> h) is a TELinear in duplicated "
          "mode, a MagicMock without Transformer Engine. Becomes an nn.Linear held whole on every TP "
          "rank, returning (out, None)",
          ON_DEMAND, *_importing(_LINEAR_SWAPS), covers=_COVERS, group="te_standins"),
    Patch("te_attention_standin",
          {f"{_SPECS}:TEDotProductAttention": None,
           f"{_EAGLE}:te_dot_product_attention_with_cp":
               "(attention_mask: torch.Tensor, num_attention_heads: int)"},
          "TE shim: the EAGLE draft layer's spec (get_gpt_modelopt_spec with an arbitrary mask) uses "
          "TEDotProductAttention, a MagicMock without Transformer Engine (deepcopy of the spec "
          "fails), and the training forward reads TEDotProductAttention.forward. The core "
          "attention becomes SDPA honouring the arbitrary mask, with key/value cloned because "
          "the TTT steps write later keys into the KV-cache tensor an earlier step saved for "
          "backward; the CP context is a no-op at CP=1 (CP > 1 is refused)",
          ON_DEMAND, *_importing(_ATTN_SWAPS), covers=_COVERS,
          depends={f"{_SPECS}:get_gpt_modelopt_spec": _SPEC_SIG}, group="te_standins"),
    Patch("te_version_without_te", {f"{_ATTN}:is_te_min_version": "(version, check_equality=True)"},
          "TE shim: Attention._adjust_key_value_for_inference calls is_te_min_version('2.2.0') in a "
          "training forward with a KV cache (EAGLE's train-time-test steps); without Transformer "
          "Engine get_te_version() is None and the comparison raises TypeError. Without TE no TE "
          "version is met (the mask type then says no_mask; SDPA applies the given mask anyway)",
          ON_DEMAND, *_VERSION_SWAPS, covers=_COVERS,
          depends={"megatron.core.transformer.attention:Attention._adjust_key_value_for_inference": None},
          group="te_standins"),
]


def apply_standins() -> list[str]:
    """Apply the group when Transformer Engine is absent (with TE the plugin's own classes work)."""
    from post_training.runtime import patches

    if have_te():
        return []
    return patches.apply(*patches.group("te_standins"))
