"""Inference fast paths for megatron-core's local (non-TE) layers on CPU.

A CPU decode step of a small model is bound by weight reads and Python dispatch, not
arithmetic; megatron's layers add dispatch around the same matmuls. Under
``torch.inference_mode()`` (no autograd graph can be needed) these wrappers skip the
autograd ``Function`` shells and redundant work at these sites and compute the same forward:

* ``tensor_parallel.layers.linear_with_frozen_weight``  -> ``F.linear(x, W) (+ b)``, the
  forward of ``LinearWithFrozenWeight`` (not with sequence parallelism);
* ``tensor_parallel.layers.copy_to_tensor_model_parallel_region`` -> identity (its forward);
* ``tensor_parallel.layers.reduce_from_tensor_model_parallel_region`` -> ``mappings._reduce``;
* ``rope_utils._apply_rotary_pos_emb_bshd`` -> the same formula, with cos/sin computed once
  per forward instead of once per layer, and without the no-op ``* mscale`` and empty
  pass-through concat (only when mscale == 1, non-interleaved, non-MLA);
* ``fused_bias_dropout._bias_dropout_add_func`` (unfused bias-dropout-add) -> the same
  in-place adds without the eval-mode ``dropout`` call, which returns its input;
* ``MLP.forward`` (unfused gated MLP: SwiGLU and friends) -> the same fc1, activation * up,
  fc2 through the module's own linear layers (quantized ones included), without building the
  ``glu`` closure per call and adding ``glu_linear_offset`` when it is 0;
* ``Attention._adjust_key_value_for_inference`` (static KV cache) -> rotate the new keys
  before they are stored and skip megatron's re-rotation of the whole cached key tensor in
  every layer at every step. RoPE is elementwise per position, so the cached keys hold the
  same values the original computes again each step (not with flash decode, which does this
  itself, nor with packed sequences).
* ``TransformerLayer.forward`` with megatron's static KV cache -> ``fast_layer.layer_forward``:
  the same ops on the layer's own modules without the general forward's branches (dense GPT
  layers only; see that module), and ``TransformerBlock.forward`` -> ``fast_layer.block_forward``
  (the same layer loop calling it directly).

Outside inference mode every call goes to the original function, so training and
autograd are untouched. Applied by ``init_runtime`` on CPU only; tests compare logits with
and without (tests/test_runtime.py). The kernels are in :mod:`.kernels`, the lean layer in
:mod:`.fast_layer`; this module only wraps megatron's functions.
"""
from __future__ import annotations

import functools

import torch

from post_training.runtime import kernels

_ORIGINALS: dict[tuple[object, str], object] = {}  # (module or class, attribute) -> original


def _fast(module, name: str, fast_impl, pass_orig: bool = False):
    orig = getattr(module, name)
    _ORIGINALS[(module, name)] = orig

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            out = fast_impl(orig, *args, **kwargs) if pass_orig else fast_impl(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return orig(*args, **kwargs)

    setattr(module, name, wrapper)


def _linear_frozen(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                   sequence_parallel, tp_group=None, *args, **kwargs):
    if sequence_parallel:
        return NotImplemented
    return kernels.linear(input, weight, bias)


def _copy_to_tp(input_, group=None):
    return input_


def _reduce_from_tp(input_, group=None):
    from megatron.core import parallel_state

    return kernels.tp_all_reduce(input_, group or parallel_state.get_tensor_model_parallel_group())


def _bias_add_residual(x_with_bias, residual, prob, training):
    x, bias = x_with_bias
    if training or x.requires_grad or residual.requires_grad or (bias is not None and bias.requires_grad):
        return NotImplemented
    return kernels.add_bias_residual_(x, bias, residual)


def _gated_mlp(self, hidden_states, per_token_scale=None, **kwargs):  # kwargs unused, as in MLP
    return NotImplemented if per_token_scale is not None else kernels.gated_mlp(self, hidden_states)


def _adjust_kv_rotated(orig, self, inference_context, query, key, value, rotary_pos_emb,
                       *args, **kwargs):
    if (inference_context is None or not inference_context.is_static_batching()
            or self.config.flash_decode or not isinstance(rotary_pos_emb, tuple)
            or rotary_pos_emb[1] is None):
        return NotImplemented
    q_emb, k_emb = rotary_pos_emb
    # What Attention.forward would apply to these rows of the cache, applied once.
    key = kernels.rotate_rows(self, key, k_emb, inference_context.sequence_len_offset)
    *out, (q_emb, _), mask_type, block_table = orig(
        self, inference_context, query, key, value, (q_emb, k_emb), *args, **kwargs)
    return (*out, (q_emb, None), mask_type, block_table)


def apply() -> bool:
    """Install the wrappers once. Returns True when newly installed."""
    if _ORIGINALS:
        return False
    from megatron.core.fusions import fused_bias_dropout
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from post_training.runtime import fast_layer  # imports megatron-core: only when applied

    _fast(layers, "linear_with_frozen_weight", _linear_frozen)
    _fast(layers, "copy_to_tensor_model_parallel_region", _copy_to_tp)
    _fast(layers, "reduce_from_tensor_model_parallel_region", _reduce_from_tp)
    _fast(rope_utils, "_apply_rotary_pos_emb_bshd", kernels.rope_bshd)
    _fast(fused_bias_dropout, "_bias_dropout_add_func", _bias_add_residual)
    _fast(Attention, "_adjust_key_value_for_inference", _adjust_kv_rotated, pass_orig=True)
    _fast(MLP, "forward", _gated_mlp)
    _fast(TransformerLayer, "forward", fast_layer.layer_forward)
    _fast(TransformerBlock, "forward", fast_layer.block_forward)
    return True


def remove() -> None:
    """Restore the originals (tests compare both paths)."""
    for (owner, name), orig in _ORIGINALS.items():
        setattr(owner, name, orig)
    _ORIGINALS.clear()
    kernels.COS_SIN.reset()
