"""Inference fast paths for megatron-core's local (non-TE) layers on CPU.

A CPU decode step of a small model is bound by weight reads and Python dispatch, not
arithmetic; megatron's layers add dispatch around the same matmuls. Under
``torch.inference_mode()`` (no autograd graph can be needed) these wrappers skip the
autograd ``Function`` shells and redundant work at these sites and compute the same forward
(the kernels are in :mod:`.kernels`):

* ``tensor_parallel.layers.linear_with_frozen_weight``  -> ``F.linear(x, W) (+ b)``, the
  forward of ``LinearWithFrozenWeight`` (not with sequence parallelism); for 2..8 fp32 rows
  ``(W @ x.T).T``, equal to fp32 rounding, not bitwise (``kernels.linear``);
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
* ``TransformerLayer.forward`` with a static KV cache that holds rotated keys ->
  ``fast_layer.layer_forward``: the same ops on the layer's own modules without the general
  forward's branches (dense GPT layers only; see that module), and ``TransformerBlock.forward``
  -> ``fast_layer.block_forward`` (the same layer loop calling it directly).

Outside inference mode every call goes to the original function, so training and autograd are
untouched. Each wrapper is an entry of the patch registry (:mod:`.patches`, group
``fastpath``), applied by ``init_runtime`` on CPU unless ``PT_NO_FASTPATH=1``; tests compare
logits with and without (tests/test_runtime.py). The KV cache's key format is not a fast path:
it is declared by the cache and honoured on every path (:mod:`.kv_format`).
"""
from __future__ import annotations

import functools

import torch

from post_training.runtime import fast_layer, kernels, patches
from post_training.runtime.patches import CPU_FAST, AttrSwap, Patch


def _fast(fast_impl):
    """``make`` for an AttrSwap: under inference mode try ``fast_impl``; the original runs
    outside inference mode and wherever ``fast_impl`` returns NotImplemented."""
    def make(orig):
        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if torch.is_inference_mode_enabled():
                out = fast_impl(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            return orig(*args, **kwargs)

        return wrapper

    return make


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


_TP = "megatron.core.tensor_parallel.layers"
_TL = "megatron.core.transformer.transformer_layer"
_SITES = [  # (name, site, recorded signature, fast implementation, what it computes instead)
    ("fast_linear_frozen_weight", f"{_TP}:linear_with_frozen_weight",
     "(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], "
     "gradient_accumulation_fusion: bool, allreduce_dgrad: bool, sequence_parallel: bool, tp_group: "
     "Optional[torch.distributed.distributed_c10d.ProcessGroup], grad_output_buffer: "
     "Optional[List[torch.Tensor]] = None, wgrad_deferral_limit: None = None, "
     "async_grad_allreduce: Optional[bool] = None) -> torch.Tensor",
     _linear_frozen, "F.linear(x, W) (+ b), the forward of LinearWithFrozenWeight without its "
                     "autograd Function (not with sequence parallelism); 2..8 fp32 rows as"
                     " (W @ x.T).T, equal to fp32 rounding (kernels.linear)"),
    ("fast_copy_to_tp", f"{_TP}:copy_to_tensor_model_parallel_region", "(input_, group=None)",
     _copy_to_tp, "identity, its forward, without the autograd Function"),
    ("fast_reduce_from_tp", f"{_TP}:reduce_from_tensor_model_parallel_region", "(input_, group=None)",
     _reduce_from_tp, "mappings._reduce, its forward, without the autograd Function"),
    ("fast_rope_bshd", "megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_bshd",
     "(t: 'Tensor', freqs: 'Tensor', rotary_interleaved: 'bool' = False, multi_latent_attention: "
     "'bool' = False, mscale: 'float' = 1.0) -> 'Tensor'",
     kernels.rope_bshd, "the same formula with cos/sin computed once per forward instead of once "
                        "per layer (mscale 1, non-interleaved, non-MLA only)"),
    ("fast_bias_dropout_add", "megatron.core.fusions.fused_bias_dropout:_bias_dropout_add_func",
     "(x_with_bias, residual, prob, training)", _bias_add_residual,
     "the same in-place adds without the eval-mode dropout call, which returns its input"),
    ("fast_gated_mlp", "megatron.core.transformer.mlp:MLP.forward",
     "(self, hidden_states, per_token_scale=None, **kwargs)", _gated_mlp,
     "the same fc1, activation * up, fc2 through the module's own linears, without the glu "
     "closure built per call"),
    ("fast_transformer_layer", f"{_TL}:TransformerLayer.forward", "(self, *args, **kwargs)",
     fast_layer.layer_forward, "fast_layer.layer_forward: the same ops on the layer's own modules for a "
                     "dense GPT layer and a static KV cache that holds rotated keys"),
    ("fast_transformer_block", "megatron.core.transformer.transformer_block:TransformerBlock.forward",
     "(self, hidden_states: Union[torch.Tensor, megatron.core.utils.WrappedTensor], attention_mask: "
     "Optional[torch.Tensor], context: Optional[torch.Tensor] = None, context_mask: "
     "Optional[torch.Tensor] = None, rotary_pos_emb: Optional[torch.Tensor] = None, rotary_pos_cos: "
     "Optional[torch.Tensor] = None, rotary_pos_sin: Optional[torch.Tensor] = None, "
     "rotary_pos_cos_sin: Optional[torch.Tensor] = None, attention_bias: Optional[torch.Tensor] = "
     "None, inference_context: Optional[megatron.core.inference.contexts.base_context."
     "BaseInferenceContext] = None, packed_seq_params: Optional[megatron.core.packed_seq_params."
     "PackedSeqParams] = None, sequence_len_offset: Optional[torch.Tensor] = None, padding_mask: "
     "Optional[torch.Tensor] = None, *, inference_params: Optional[megatron.core.inference.contexts."
     "base_context.BaseInferenceContext] = None, dynamic_inference_decode_only: Optional[bool] = None)",
     fast_layer.block_forward, "fast_layer.block_forward: the same layer loop calling the lean "
                               "layer directly (static KV cache, no FP8/FP4, SP or offloading)"),
]
# What the lean layer reproduces of megatron's layer: a change there must be looked at.
_LEAN_LAYER_DEPENDS = {
    f"{_TL}:TransformerLayer._forward_attention":
        "(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, context: "
        "Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None, rotary_pos_emb: "
        "Optional[torch.Tensor] = None, rotary_pos_cos: Optional[torch.Tensor] = None, rotary_pos_sin: "
        "Optional[torch.Tensor] = None, rotary_pos_cos_sin: Optional[torch.Tensor] = None, "
        "attention_bias: Optional[torch.Tensor] = None, inference_context: Optional[Any] = None, "
        "packed_seq_params: Optional[megatron.core.packed_seq_params.PackedSeqParams] = None, "
        "sequence_len_offset: Optional[torch.Tensor] = None, padding_mask: Optional[torch.Tensor] = "
        "None, *, inference_params: Optional[Any] = None)",
    f"{_TL}:TransformerLayer._forward_mlp": "(self, hidden_states, inference_context=None, padding_mask=None)",
    "megatron.core.transformer.attention:SelfAttention.get_query_key_value_tensors":
        "(self, hidden_states: 'Tensor', key_value_states: 'Tensor | None' = None, output_gate: "
        "'bool' = False, split_qkv: 'bool' = True) -> 'tuple[Tensor, Tensor, Tensor, Tensor] | "
        "tuple[Tensor, Tensor, Tensor] | tuple[Tensor, list[int]]'",
}


def _entry(name, site, signature, impl, instead) -> Patch:
    apply, remove = patches.swaps(AttrSwap(site, _fast(impl)))
    return Patch(name, {site: signature},
                 f"under torch.inference_mode: {instead}. A CPU decode step of a small model is "
                 "bound by Python dispatch around the matmuls; same values (tests/test_runtime.py)",
                 CPU_FAST, apply, remove,
                 depends=_LEAN_LAYER_DEPENDS if name == "fast_transformer_layer" else {},
                 group="fastpath")


PATCHES = [_entry(*s) for s in _SITES]


def apply() -> bool:
    """Install the fast-path group (tests toggle it). True when newly installed."""
    return bool(patches.apply(*patches.group("fastpath")))


def remove() -> None:
    """Restore megatron's originals at every fast-path site (tests compare both paths)."""
    patches.remove(*patches.group("fastpath"))
    kernels.COS_SIN.reset()


def is_applied() -> bool:
    return all(patches.is_applied(n) for n in patches.group("fastpath"))

