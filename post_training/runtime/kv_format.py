"""What a static KV cache holds: keys before or after RoPE, as its context declares.

megatron-core's static path caches keys *unrotated* and, in every layer at every step, rotates
the whole cached key tensor again (``Attention.forward`` after ``_adjust_key_value_for_inference``).
RoPE is elementwise per position, so caching the keys *rotated* (as megatron's own dynamic
context and flash decode do) holds the same values the original computes again each step, and
saves that work. The two formats must never mix: a cache filled in one and read in the other is
wrong. So the format is a property of the cache, fixed when it is created
(:class:`post_training.inference.KVCache`) and stored on the context (:data:`ATTR`), and every
path honours it, whichever fast paths are installed and whether or not inference mode is on:

* the ``kv_cache_rotated_keys`` registry entry wraps ``Attention._adjust_key_value_for_inference``:
  for a context that declares rotated keys it rotates the new keys before they are stored and
  tells ``Attention.forward`` not to rotate keys again; for any other context it is megatron's;
* the lean layer (:mod:`.fast_layer`) runs only for contexts that declare rotated keys.

A context that declares nothing (made by megatron or ModelOpt code) is megatron's: unrotated.
"""
from __future__ import annotations

import functools

from post_training.runtime import kernels
from post_training.runtime.patches import ALWAYS, AttrSwap, Patch, swaps

ATTR = "pt_keys_rotated"  # on the inference context: True = cached keys are post-RoPE


def declare(ctx, rotated: bool) -> None:
    setattr(ctx, ATTR, bool(rotated))


def keys_rotated(ctx) -> bool:
    """Whether ``ctx`` declares post-RoPE keys (False for a context that declares nothing)."""
    return getattr(ctx, ATTR, False) is True


def _adjust_key_value(orig):
    @functools.wraps(orig)
    def adjust(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if inference_context is None or not keys_rotated(inference_context):
            return orig(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        if (not inference_context.is_static_batching() or self.config.flash_decode
                or (rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple))):
            # Cannot happen through KVCache (it refuses flash decode); never fall back silently.
            raise NotImplementedError("a rotated-key KV cache needs megatron's static, "
                                      "non-flash-decode attention path")
        if rotary_pos_emb is None or rotary_pos_emb[1] is None:  # no RoPE: both formats agree
            return orig(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        q_emb, k_emb = rotary_pos_emb
        # What Attention.forward would apply to these rows of the cache, applied once.
        key = kernels.rotate_rows(self, key, k_emb, inference_context.sequence_len_offset)
        *out, (q_emb, _), mask_type, block_table = orig(
            self, inference_context, query, key, value, (q_emb, k_emb), *args, **kwargs)
        return (*out, (q_emb, None), mask_type, block_table)  # keys are rotated already

    return adjust


_ATT = "megatron.core.transformer.attention"
PATCHES = [
    Patch(
        "kv_cache_rotated_keys",
        {f"{_ATT}:Attention._adjust_key_value_for_inference":
            "(self, inference_context: 'BaseInferenceContext', query: 'Tensor', key: 'Tensor', "
            "value: 'Tensor', rotary_pos_emb: 'Tensor', rotary_pos_cos: 'Optional[Tensor]' = None, "
            "rotary_pos_sin: 'Optional[Tensor]' = None, rotary_pos_cos_sin: 'Optional[Tensor]' = None, "
            "sequence_len_offset: 'Optional[int]' = None, *, inference_params: "
            "'Optional[BaseInferenceContext]' = None) -> 'tuple[Tensor, Tensor, Tensor, Tensor, "
            "AttnMaskType, Tensor]'"},
        "megatron's static KV cache stores keys before RoPE and re-rotates the whole cache in every "
        "layer at every step; for a context that declares rotated keys (post_training.inference."
        "KVCache) the new keys are rotated once before they are stored and Attention.forward is "
        "told not to rotate keys again. Contexts that declare nothing are left to megatron. "
        "Applied everywhere so that the declared format is honoured whatever else is installed",
        ALWAYS, *swaps(AttrSwap(f"{_ATT}:Attention._adjust_key_value_for_inference", _adjust_key_value)),
        covers="megatron-core Attention.forward (static inference context, self-attention)",
        depends={f"{_ATT}:apply_rotary_pos_emb":
                 "(t: 'Tensor', freqs: 'Tensor', config: 'TransformerConfig', cu_seqlens: "
                 "'Optional[Tensor]' = None, mscale: 'float' = 1.0, cp_group: "
                 "'torch.distributed.ProcessGroup' = None)"},
        group="kv_format"),
]
