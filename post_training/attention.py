"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's ``DotProductAttention`` in a layer spec (same constructor and
forward signature), usable on CPU and GPU. Handles GQA, causal masks, arbitrary boolean
masks (EAGLE training, packed documents, left-padded batches: a given mask is always the
whole mask) and the KV-cache cases of megatron's static inference context without a mask:

* queries == keys: ordinary causal attention;
* one query against a cache: no mask;
* k > 1 queries against a longer cache (speculative verify, chunked prefill): causal
  mask aligned to the *bottom-right*. SDPA's ``is_causal`` aligns top-left, which is
  wrong here, and megatron passes ``no_mask`` once the cache is non-empty.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


def bottom_right_causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """Boolean mask, True = attend: query i sees keys up to position sk - sq + i."""
    q = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    k = torch.arange(sk, device=device).unsqueeze(0)
    return k <= q


class SDPAttention(MegatronModule):
    """Core attention: [sq, b, np, hn] x [sk, b, ng, hn] -> [sq, b, np * hn]."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        kv_channels = config.kv_channels
        self.hidden_size_per_partition = self.heads_per_partition * kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by SDPAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, nh, hn = query.shape
        sk, ng = key.size(0), key.size(2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))

        mask, is_causal = None, False
        if mask_type == AttnMaskType.arbitrary or attention_mask is not None:
            # A given mask is the whole mask, causality included (as in megatron's softmax, which
            # builds its default causal mask only when none is given): EAGLE's arbitrary masks,
            # packed documents, and batched generation's left padding against a KV cache.
            if attention_mask is not None:
                mask = ~attention_mask.to(torch.bool)  # megatron: True = masked out
                if attention_bias is not None:
                    raise ValueError("attention_bias with an explicit mask is not supported")
        elif sq == sk:
            is_causal = mask_type != AttnMaskType.no_mask
        elif sq > 1:
            # KV-cache chunk (megatron says no_mask once the cache is non-empty).
            mask = bottom_right_causal_mask(sq, sk, q.device)
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            if mask is not None or is_causal:
                base = mask if mask is not None else bottom_right_causal_mask(sq, sk, q.device)
                bias = bias.masked_fill(~base, float("-inf"))
            mask, is_causal = bias, False

        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=ng != nh,
        )
        # [b, h, sq, d] -> [sq, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
