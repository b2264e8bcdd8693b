"""Tensor kernels shared by the inference fast paths (:mod:`.fastpath`) and the lean layer
(:mod:`.fast_layer`): megatron-core's own forward formulas without its dispatch around them.

Each computes what the megatron function it names computes, with the same ops in the same
order, so results are bit-identical (tests/test_runtime.py); the one exception, small-row
fp32 products in :func:`linear`, is documented there. Functions that cannot reproduce a
variant return ``NotImplemented`` and the caller runs megatron's code. Nothing here patches
anything; this module does not import megatron-core at import time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def one_thread(active: bool) -> Iterator[None]:
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


class CosSinCache:
    """cos/sin of the slices of a rotary table, shared by all layers of a forward.

    megatron recomputes them per layer (2 x num_layers times a step). Slices of inference
    tensors are not tracked as views, so entries are keyed by the table's storage address
    and the slice's offset/shape/stride. A tensor on that storage is held, so the address
    cannot be reused by another allocation while cached; a new table resets the cache.
    megatron never writes to a rotary table in place."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.holder: torch.Tensor | None = None
        self.ptr = -1
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ptr = freqs.untyped_storage().data_ptr()
        if ptr != self.ptr:
            self.holder, self.ptr, self.entries = freqs, ptr, {}
        key = (freqs.storage_offset(), tuple(freqs.shape), tuple(freqs.stride()), dtype)
        if key not in self.entries:
            with one_thread(freqs.numel() > 2048):  # see cpu_compat.warm_up_vml
                cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
            half = sin.shape[-1] // 2
            # rotate_half(t) * sin == roll(t, half) * [-sin_lo, sin_hi]: a sign flip is exact.
            self.entries[key] = (cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))
        return self.entries[key]


COS_SIN = CosSinCache()


def rope_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
    """megatron's ``rope_utils._apply_rotary_pos_emb_bshd`` with cos/sin from :data:`COS_SIN`
    (once per forward), without the no-op ``* mscale`` and empty pass-through concat; or
    NotImplemented where its formula differs (interleaved, partial rotary, YaRN mscale, MLA)."""
    if rotary_interleaved or multi_latent_attention or mscale != 1.0 or t.shape[-1] != freqs.shape[-1]:
        return NotImplemented
    cos, signed_sin = COS_SIN.get(freqs, t.dtype)
    return t * cos + torch.roll(t, t.shape[-1] // 2, dims=-1) * signed_sin


def rotate_rows(att, t, table, start: int):
    """megatron's RoPE (as ``Attention.forward`` calls it) of the rows ``start..`` of a table
    for ``t`` [s, b, heads, dim]."""
    from megatron.core.transformer import attention

    cfg = att.config
    return attention.apply_rotary_pos_emb(
        t, table[start:start + t.size(0)], config=cfg,
        mscale=attention._yarn_get_concentration_factor_from_config(cfg), cp_group=att.pg_collection.cp)


def add_bias_residual_(x, bias, residual):
    """The in-place branch of megatron's bias-dropout-add in eval mode: x += bias; dropout
    (identity); x += residual (cast to x's dtype, as the original does)."""
    if bias is not None:
        x.add_(bias)
    return x.add_(residual if residual.dtype == x.dtype else residual.to(x.dtype))


# Row counts of a speculative verify of K + 1 tokens or a small batch's decode step.
SMALL_ROWS = 8


def linear(x, weight, bias=None):
    """The forward of megatron's ``LinearWithFrozenWeight``: ``x @ W.T`` then ``+ b``.
    F.linear == matmul(x, W.t()) bit for bit on CPU (checked on SmolLM2's shapes), one op
    fewer; the bias is added separately, as megatron does (a fused addmm can round otherwise).

    Documented deviation: for 2..SMALL_ROWS input rows in fp32 on CPU the product is taken as
    ``(W @ x.T).T``. MKL's GEMM for ``x @ W.T`` with 2-4 rows is a slow case here: in a SmolLM2
    step (weights cold in cache) fc1 with 3 rows took 1.7 ms against 0.7 ms for one, the
    49152 x 576 output layer 38 / 53 ms for 2 / 3 rows against 16 ms, so a speculative verify of
    K + 1 tokens cost 1.5-2.2 decode steps; with the transposed product (W read once) it costs
    0.8-1.1 (benchmarks/RESULTS.md). It sums in another order, so it matches F.linear to fp32
    rounding (|diff| <= 1e-5 * (1 + |y|), tests/test_runtime.py), not bit for bit. One row (a
    decode step) and more than SMALL_ROWS rows (a prefill) stay on F.linear: plain decoding and
    prefill are unchanged. Greedy speculative decoding was never bitwise across row counts
    (F.linear with k rows does not reproduce k one-row calls; nor does attention over k
    queries), so its losslessness already meant: the same argmax up to fp32 rounding of
    near-ties (tests/test_speculative.py).
    """
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (1 < rows <= SMALL_ROWS and weight.dim() == 2 and x.dtype == weight.dtype == torch.float32
            and x.device.type == "cpu"):
        out = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
        out = out.view(*x.shape[:-1], weight.shape[0])
    else:
        out = F.linear(x, weight)
    return out + bias if bias is not None else out


def tp_all_reduce(x, group):
    """The forward of ``reduce_from_tensor_model_parallel_region``: megatron's own all-reduce
    (``mappings._reduce``: a no-op on one rank)."""
    from megatron.core.tensor_parallel import mappings

    return mappings._reduce(x, group)


def call_module(mod, x):
    return mod(x)


def gated_mlp(mlp, x, fc1=call_module, fc2=call_module):
    """The unfused gated MLP (SwiGLU and friends) of megatron's ``MLP.forward`` through
    ``fc1(mlp.linear_fc1, x)`` and ``fc2(mlp.linear_fc2, y)``, without building its ``glu``
    closure per call; NotImplemented for the variants megatron computes otherwise."""
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
