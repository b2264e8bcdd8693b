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
and without (tests/test_runtime.py).
"""
from __future__ import annotations

import contextlib
import functools

import torch

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
    # F.linear == matmul(x, W.t()) bit for bit on CPU (checked on SmolLM2's shapes), one op fewer.
    out = torch.nn.functional.linear(input, weight)
    return out + bias if bias is not None else out


def _copy_to_tp(input_, group=None):
    return input_


def _reduce_from_tp(input_, group=None):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import mappings

    return mappings._reduce(input_, group or parallel_state.get_tensor_model_parallel_group())


@contextlib.contextmanager
def _one_thread(active: bool):
    """One intra-op thread: the table is computed once per forward, and a single-threaded
    MKL VML call cannot race with itself (torch splits above 2048 elements)."""
    n = torch.get_num_threads()
    if not active or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _CosSinCache:
    """cos/sin of the slices of a rotary table, shared by all layers of a forward.

    megatron recomputes them per layer (2 x num_layers times a step). Slices of inference
    tensors are not tracked as views, so entries are keyed by the table's storage address
    and the slice's offset/shape/stride. A tensor on that storage is held, so the address
    cannot be reused by another allocation while cached; a new table resets the cache.
    megatron never writes to a rotary table in place."""

    def __init__(self) -> None:
        self.holder: torch.Tensor | None = None
        self.ptr = -1
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ptr = freqs.untyped_storage().data_ptr()
        if ptr != self.ptr:
            self.holder, self.ptr, self.entries = freqs, ptr, {}
        key = (freqs.storage_offset(), tuple(freqs.shape), tuple(freqs.stride()), dtype)
        if key not in self.entries:
            with _one_thread(freqs.numel() > 2048):  # see cpu_compat.warm_up_vml
                cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
            half = sin.shape[-1] // 2
            # rotate_half(t) * sin == roll(t, half) * [-sin_lo, sin_hi]: a sign flip is exact.
            self.entries[key] = (cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))
        return self.entries[key]


_COS_SIN = _CosSinCache()


def _rope_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
    if rotary_interleaved or multi_latent_attention or mscale != 1.0 or t.shape[-1] != freqs.shape[-1]:
        return NotImplemented
    cos, signed_sin = _COS_SIN.get(freqs, t.dtype)
    return t * cos + torch.roll(t, t.shape[-1] // 2, dims=-1) * signed_sin


def add_bias_residual_(x, bias, residual):
    """The original's in-place branch in eval mode: x += bias; dropout (identity); x += residual
    (cast to x's dtype, as the original does)."""
    if bias is not None:
        x.add_(bias)
    return x.add_(residual if residual.dtype == x.dtype else residual.to(x.dtype))


def _bias_add_residual(x_with_bias, residual, prob, training):
    x, bias = x_with_bias
    if training or x.requires_grad or residual.requires_grad or (bias is not None and bias.requires_grad):
        return NotImplemented
    return add_bias_residual_(x, bias, residual)


def _call_module(mod, x):
    return mod(x)


def gated_mlp(mlp, x, fc1=_call_module, fc2=_call_module):
    """The unfused gated MLP (SwiGLU and friends) through ``fc1(mlp.linear_fc1, x)`` and
    ``fc2(mlp.linear_fc2, y)``; NotImplemented for the variants megatron computes otherwise."""
    c = mlp.config
    if (c.use_te_activation_func or c.bias_activation_fusion or not c.gated_linear_unit
            or c.activation_func_clamp_value is not None):
        return NotImplemented
    h, bias = fc1(mlp.linear_fc1, x)
    if bias is not None:
        h = h + bias
    gate, up = torch.chunk(h, 2, dim=-1)
    if c.glu_linear_offset:
        up = up + c.glu_linear_offset
    return fc2(mlp.linear_fc2, c.activation_func(gate) * up)


def _gated_mlp(self, hidden_states, per_token_scale=None, **kwargs):  # kwargs unused, as in MLP
    return NotImplemented if per_token_scale is not None else gated_mlp(self, hidden_states)


def rotate_rows(att, t, table, start: int):
    """megatron's RoPE (as ``Attention.forward`` calls it) of the rows ``start..`` of a table
    for ``t`` [s, b, heads, dim]."""
    from megatron.core.transformer import attention

    cfg = att.config
    return attention.apply_rotary_pos_emb(
        t, table[start:start + t.size(0)], config=cfg,
        mscale=attention._yarn_get_concentration_factor_from_config(cfg), cp_group=att.pg_collection.cp)


def _adjust_kv_rotated(orig, self, inference_context, query, key, value, rotary_pos_emb,
                       *args, **kwargs):
    if (inference_context is None or not inference_context.is_static_batching()
            or self.config.flash_decode or not isinstance(rotary_pos_emb, tuple)
            or rotary_pos_emb[1] is None):
        return NotImplemented
    q_emb, k_emb = rotary_pos_emb
    # What Attention.forward would apply to these rows of the cache, applied once.
    key = rotate_rows(self, key, k_emb, inference_context.sequence_len_offset)
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

    from post_training.runtime import fast_layer

    _fast(layers, "linear_with_frozen_weight", _linear_frozen)
    _fast(layers, "copy_to_tensor_model_parallel_region", _copy_to_tp)
    _fast(layers, "reduce_from_tensor_model_parallel_region", _reduce_from_tp)
    _fast(rope_utils, "_apply_rotary_pos_emb_bshd", _rope_bshd)
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
    _COS_SIN.holder, _COS_SIN.ptr, _COS_SIN.entries = None, -1, {}
