"""SDPAttention against a plain softmax(QK^T)V reference, for every mask case."""
import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from post_training.attention import SDPAttention, bottom_right_causal_mask


def reference(q, k, v, allowed):
    # q [sq,b,h,d], k/v [sk,b,g,d], allowed [sq,sk] or [b,1,sq,sk] (True = attend)
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(q.size(0), q.size(1), -1)


@pytest.fixture
def attn(runtime):
    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            use_cpu_initialization=True)
    return lambda mask_type: SDPAttention(cfg, 1, mask_type, "self").eval()


def qkv(sq, sk, b=2):
    g = torch.Generator().manual_seed(sq * 100 + sk)
    return (torch.randn(sq, b, 4, 16, generator=g), torch.randn(sk, b, 2, 16, generator=g),
            torch.randn(sk, b, 2, 16, generator=g))


def test_causal_full_sequence(attn):
    q, k, v = qkv(7, 7)
    out = attn(AttnMaskType.causal)(q, k, v, None)
    ref = reference(q, k, v, torch.ones(7, 7, dtype=torch.bool).tril())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_single_query_against_cache_sees_everything(attn):
    q, k, v = qkv(1, 9)
    out = attn(AttnMaskType.causal)(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    torch.testing.assert_close(out, reference(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_chunk_against_cache_is_bottom_right_causal(attn):
    q, k, v = qkv(3, 10)
    out = attn(AttnMaskType.causal)(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    mask = bottom_right_causal_mask(3, 10, q.device)
    assert mask[0].sum() == 8 and mask[-1].all()
    torch.testing.assert_close(out, reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    top_left = reference(q, k, v, torch.ones(3, 10, dtype=torch.bool).tril())
    assert (out - top_left).abs().max() > 1e-3  # the bug this guards against


def test_arbitrary_mask(attn):
    q, k, v = qkv(6, 6)
    masked_out = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.6
    masked_out[..., 0] = False  # every query keeps one key
    out = attn(AttnMaskType.arbitrary)(q, k, v, masked_out)
    torch.testing.assert_close(out, reference(q, k, v, ~masked_out), atol=1e-5, rtol=1e-5)


def test_causal_type_honours_a_given_mask(attn):
    """Megatron's local spec builds causal attention but passes the batch's attention mask
    down (packed documents in training): a given mask is the whole mask, causality included,
    as in megatron's softmax (chat_data.packed_attention_mask is block-diagonal and causal)."""
    q, k, v = qkv(6, 6)
    docs = torch.tensor([0, 0, 0, 1, 1, 1])
    allowed = (docs[:, None] == docs[None, :]) & torch.ones(6, 6, dtype=torch.bool).tril()
    masked_out = (~allowed).expand(2, 1, 6, 6)
    out = attn(AttnMaskType.causal)(q, k, v, masked_out)
    torch.testing.assert_close(out, reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    plain = attn(AttnMaskType.causal)(q, k, v, None)
    assert (out - plain).abs().max() > 1e-3
