"""CPU emulation of ModelOpt's dynamic block quantization: NVFP4 and the MX formats.

ModelOpt fake-quantizes these formats only with CUDA code. Its single entry point,
``modelopt.torch.quantization.tensor_quant._dynamic_block_quantize_impl`` (the CPU/CUDA
kernel of ``torch.ops.tensorrt.dynamic_block_quantize_op``, called by
``DynamicBlockQuantizationFunction`` from ``TensorQuantizer._fake_quantize``), asserts
``amax.is_cuda`` for E4M3-scaled formats (NVFP4) and builds the CUDA extension
``modelopt_cuda_ext_mx`` for everything else (MX, E8M0 scales). :func:`install` (the patch
registry's ``block_quant_cpu`` entry, applied by ``init_runtime`` without CUDA) registers
:func:`dynamic_block_quantize` as the op's CPU kernel; CUDA tensors still go to ModelOpt.

The emulation follows the two GPU code paths step by step, in plain torch:

* NVFP4 on Ada/Hopper/Blackwell (triton present): ``fp4_fake_quant_block`` of
  ``kernels/quantization/gemm/fp4_kernel_hopper.py`` + ``common/nvfp4_quant.py`` ->
  :func:`fp4_fake_quant_block`. Always 16-element blocks (ModelOpt passes no block size).
* NVFP4 with ``tensor_quant.DISABLE_TRITON_KERNEL`` (or pre-Ada GPUs), and every MX format:
  ``fused_amax_convert`` of ``kernels/quantization/gemm/tensor_quant_mx.cu`` ->
  :func:`fused_amax_convert`.

Replicated exactly: the zero-padded partial last block, the block amax, torch-CUDA's
``amax / 2688.0`` (a multiply by the fp32 reciprocal, not a division), E4M3 saturation
(``satfinite``) and round-to-nearest-even, the kernels' E2M1/FP6/INT8 tie rules (E2M1 through
ModelOpt's own ``NVFP4QTensor._cast_fp4``), Triton's ``scale < 1e-5 -> 1.0`` rule, the E8M0
exponent bit trick of ``compute_scale_e8m0_NV``, the double-precision two-level scale of
``compute_scale_with_global``, and flush-to-zero of fp32 subnormals in the MX extension (built
with ``--use_fast_math``). Not replicable: both kernels divide in fp32 with approximate
instructions (Triton ``div.full.f32``; ``--use_fast_math``), this module divides with IEEE
rounding, so a result can differ where a quotient lies within ~2 ulp of a rounding boundary
(an E2M1/E4M3 tie, or ``amax / fmt_max`` at a power of two). The default is the Triton
path, as on the GPUs that run NVFP4. Not emulated: NaN inputs (the kernels' NaN-ignoring max
reductions and uninitialised signs) and an infinite NVFP4 per-tensor amax (Triton's NaN-dropping
``minimum``); inf elements otherwise follow the kernels (saturate to the format's max).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3_MAX = 448.0
_F32_TINY = 2.0**-126  # smallest normal fp32; the MX extension flushes anything smaller to 0

# Element formats of tensor_quant_mx.h: (values, rounding bounds, ties to even?).
_TABLES: dict[str, tuple[list[float], list[float], bool]] = {
    "E1M2": ([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5], [0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25], True),
    "E0M3": ([0, 1, 2, 3, 4, 5, 6, 7], [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5], True),
    "E3M0": ([0, 0.25, 0.5, 1, 2, 4, 8, 16], [0.125, 0.375, 0.75, 1.5, 3, 6, 12], False),
    "E3M2": ([0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875,
              1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28],
             [0.03125, 0.09375, 0.15625, 0.21875, 0.28125, 0.34375, 0.40625, 0.46875, 0.5625,
              0.6875, 0.8125, 0.9375, 1.125, 1.375, 1.625, 1.875, 2.25, 2.75, 3.25, 3.75, 4.5,
              5.5, 6.5, 7.5, 9, 11, 13, 15, 18, 22, 26], True),
    "E2M3": ([0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1, 1.125, 1.25, 1.375, 1.5, 1.625,
              1.75, 1.875, 2, 2.25, 2.5, 2.75, 3, 3.25, 3.5, 3.75, 4, 4.5, 5, 5.5, 6, 6.5, 7, 7.5],
             [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375, 1.0625, 1.1875,
              1.3125, 1.4375, 1.5625, 1.6875, 1.8125, 1.9375, 2.125, 2.375, 2.625, 2.875, 3.125,
              3.375, 3.625, 3.875, 4.25, 4.75, 5.25, 5.75, 6.25, 6.75, 7.25], True),
}
# get_format_max of tensor_quant_mx.h.
FORMAT_MAX: dict[str, float] = {
    "E4M3": 448.0, "E5M2": 57344.0, "INT8": 127.0, "E2M1": 6.0, "E0M3": 7.0, "E3M0": 16.0,
    "E1M2": 3.5, "E3M2": 28.0, "E2M3": 7.5,
}


def _ftz(t: Tensor) -> Tensor:
    """fp32 subnormals -> 0, as ``-ftz=true`` (from ``--use_fast_math``) does to every result."""
    return torch.where(t.abs() < _F32_TINY, torch.zeros_like(t), t)


def _blocks(x: Tensor, block: int) -> tuple[Tensor, int]:
    """(rows, blocks, block) fp32 view of ``x`` over its last dim, zero-padded like the kernels."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).float()
    if n % block:
        rows = F.pad(rows, (0, block - n % block))
    return rows.view(rows.shape[0], -1, block), n


def _unblocks(y: Tensor, shape: torch.Size, n: int) -> Tensor:
    return y.reshape(y.shape[0], -1)[:, :n].reshape(shape)


def _e2m1(a: Tensor) -> Tensor:
    """Magnitudes -> nearest E2M1 value, ties to even, with ModelOpt's own rounding
    (``NVFP4QTensor._cast_fp4``: the same decisions as Triton's ``fp4_round_magnitude`` and the
    extension's ``round_to_even`` table). inf/NaN -> 6, as the table code does."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    codes = NVFP4QTensor._cast_fp4(a.clone())  # it takes abs_() in place
    return NVFP4QTensor.get_e2m1_values(a.device)[codes.long()]


def _round_table(a: Tensor, fmt: str) -> Tensor:
    """``round_to_even`` / ``round_away_from_zero`` of tensor_quant_mx.h on magnitudes: a value
    equal to bound i goes down when i is even, up when odd (away from zero for E3M0)."""
    values, bounds, even = _TABLES[fmt]
    b = torch.tensor(bounds, dtype=torch.float32, device=a.device)
    v = torch.tensor(values, dtype=torch.float32, device=a.device)
    if even:
        idx = torch.searchsorted(b, a)  # number of bounds < a
        at_bound = b[idx.clamp(max=len(bounds) - 1)] == a
        idx = idx + (at_bound & (idx % 2 == 1) & (idx < len(bounds))).long()
    else:
        idx = torch.searchsorted(b, a, right=True)
    return torch.where(torch.isnan(a), v[-1], v[idx.clamp(max=len(values) - 1)])


def convert_to_format(a: Tensor, fmt: str) -> Tensor:
    """``convert_to_types`` of tensor_quant_mx.h for non-negative fp32 magnitudes."""
    if fmt == "E4M3":  # __nv_fp8_e4m3(float): round to nearest even, saturate to finite
        return a.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    if fmt == "E5M2":
        return a.clamp(-57344.0, 57344.0).to(torch.float8_e5m2).float()
    if fmt == "INT8":  # rint (half to even), float->int (NaN -> 0), clamp to the symmetric range
        return torch.nan_to_num(a.round(), nan=0.0).clamp(-127.0, 127.0)
    if fmt == "E2M1":
        return _e2m1(a)
    if fmt in _TABLES:
        return _round_table(a, fmt)
    raise NotImplementedError(f"no CPU emulation of element format {fmt}")


def _pow2(e: Tensor) -> Tensor:
    """2**e for integer e in [-127, 127] built from the exponent bits; 2**-127 (subnormal) -> 0
    as in the extension, where ``mul.ftz`` flushes it."""
    bits = ((e.clamp(min=-126) + 127) << 23).to(torch.int32).view(torch.float32)
    return torch.where(e >= -126, bits, torch.zeros_like(bits))


def _scale_e8m0(amax: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """``compute_scale`` -> ``compute_scale_e8m0_NV``: unscale = 2**ceil(log2(amax / fmt_max)),
    taken from the fp32 bits of the ratio, not from a log2 that can round."""
    ratio = _ftz(amax / FORMAT_MAX[fmt])
    bits = ratio.view(torch.int32)
    exp, sig = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    up = (sig > 0) & (exp != 0xFE) & ~((exp == 0) & (sig <= 0x400000))
    e = torch.where(up, exp - 126, exp - 127)
    invalid = (amax == 0) | ~torch.isfinite(amax)
    one = torch.ones_like(amax)
    return torch.where(invalid, one, _pow2(-e)), torch.where(invalid, one, _pow2(e))


def _scale_with_global(amax: Tensor, global_amax: Tensor, fmt: str, scale_fmt: str
                       ) -> tuple[Tensor, Tensor]:
    """``compute_scale_with_global``: the block scale amax/fmt_max, expressed relative to the
    per-tensor amax, rounded to ``scale_fmt``; the two-level factor is kept in double."""
    g = _ftz(global_amax.float().reshape(()))
    emax, smax = FORMAT_MAX[fmt], FORMAT_MAX[scale_fmt]
    local_unscale = _ftz(amax / emax)
    two_level = smax * (torch.tensor(emax, dtype=torch.float32) / g).double()
    q = convert_to_format((local_unscale.double() * two_level).float(), scale_fmt).double()
    local_unscale_q = q / two_level
    scale = torch.reciprocal(local_unscale_q).float()  # double 1. / q, then to float
    unscale = _ftz(local_unscale_q.float())
    invalid = (amax == 0) | ~torch.isfinite(amax) | (g == 0) | ~torch.isfinite(g)
    one = torch.ones_like(amax)
    return torch.where(invalid, one, scale), torch.where(invalid, one, unscale)


def fused_amax_convert(x: Tensor, block_size: int, fmt: str, scale_fmt: str,
                       global_amax: Tensor | None = None) -> Tensor:
    """Emulates ``modelopt_cuda_ext_mx.fused_amax_convert``: per block of the last dim, a scale
    from the block amax (E8M0, or ``scale_fmt`` relative to ``global_amax``), then
    ``sign(x) * convert(|x| * scale) * unscale``, written back in ``x.dtype``."""
    if block_size not in (8, 16, 32):
        raise ValueError("Blocksize for fused call must be one of {8, 16, 32}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused_amax_convert_kernel not implemented for {x.dtype}")
    blocks, n = _blocks(x, block_size)
    blocks = _ftz(blocks)
    amax = blocks.abs().amax(-1, keepdim=True)
    if global_amax is not None and scale_fmt != "E8M0":
        scale, unscale = _scale_with_global(amax, global_amax, fmt, scale_fmt)
    elif global_amax is None and scale_fmt == "E8M0":
        scale, unscale = _scale_e8m0(amax, fmt)
    else:  # the kernel returns non-finite values (E8M0 with a global amax) or is never called
        raise NotImplementedError(f"{fmt} with {scale_fmt} scales and global amax {global_amax}")
    out = _ftz(convert_to_format(blocks.abs() * scale, fmt) * unscale)
    out = torch.where(blocks < 0, -out, out)
    return _unblocks(out, x.shape, n).to(x.dtype)


def cuda_global_scale(global_amax: Tensor) -> Tensor:
    """``global_amax.float() / (6.0 * 448.0)`` as torch computes it on CUDA: a CPU scalar divisor
    becomes a multiply by its fp32 reciprocal (BinaryDivTrueKernel.cu), which can differ by an
    ulp from CPU torch's true division."""
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(6.0 * 448.0, dtype=torch.float32)
    return global_amax.float() * inv.to(global_amax.device)


def fp4_fake_quant_block(x: Tensor, global_amax: Tensor, block_size: int = 16) -> Tensor:
    """Emulates ModelOpt's Triton ``fp4_fake_quant_block`` (NVFP4 fake quantization): block
    scale = E4M3(min(block_amax / (6 * gs), 448)) * gs with gs = global_amax / 2688, a scale
    below 1e-5 replaced by 1.0, then |x| / scale rounded onto E2M1 and multiplied back."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"Unsupported dtype for fp4 fake quantization: {x.dtype}")
    blocks, n = _blocks(x, block_size)
    gs = cuda_global_scale(global_amax).reshape(-1)[:1].reshape(())  # tl.load of element 0
    gs = torch.where(gs > 0.0, gs, torch.tensor(1e-12, dtype=torch.float32))
    x_abs = blocks.abs()
    in_fp8_range = (x_abs.amax(-1, keepdim=True) / (6.0 * gs)).clamp(max=E4M3_MAX)
    scale = in_fp8_range.to(torch.float8_e4m3fn).float() * gs
    floor = torch.tensor(1e-5, dtype=torch.float32)  # Triton's constant, in fp32
    scale = torch.where(scale >= floor, scale, torch.ones_like(scale))
    q = _e2m1(x_abs / scale) * scale
    out = torch.where(blocks >= 0, q, -q)
    return _unblocks(out, x.shape, n).to(x.dtype)


def dynamic_block_quantize(inputs: Tensor, block_size: int, amax: Tensor | None, num_bits: int,
                           exponent_bits: int, scale_num_bits: int, scale_exponent_bits: int
                           ) -> Tensor:
    """``_dynamic_block_quantize_impl`` with its CUDA kernels emulated: same argument decoding
    and path choice (Triton for E2M1 with E4M3 scales unless ``DISABLE_TRITON_KERNEL``)."""
    from modelopt.torch.quantization import tensor_quant as tq

    scale_bits = (scale_exponent_bits, scale_num_bits - scale_exponent_bits - 1)
    fmt_bits: Any = num_bits
    if exponent_bits != 0:
        fmt_bits = (exponent_bits, num_bits - exponent_bits - 1)
    if fmt_bits not in tq.mx_format_map:
        raise NotImplementedError(
            f"Unsupported num_bits: {fmt_bits}, scale_bits: {scale_bits} for dynamic block "
            "quantization.")
    assert scale_bits in tq.mx_format_map, f"Scale bits should be in {tq.mx_format_map.keys()}"
    if scale_bits != (8, 0):
        if amax is None:
            raise ValueError("E4M3-scaled block quantization needs the per-tensor amax")
        if amax.numel() != 1:
            amax = amax.amax()
    if fmt_bits == (2, 1) and scale_bits == (4, 3) and not tq.DISABLE_TRITON_KERNEL:
        return fp4_fake_quant_block(inputs, amax)  # ModelOpt passes no block size: 16
    return fused_amax_convert(inputs, block_size, tq.mx_format_map[fmt_bits],
                              tq.mx_format_map[scale_bits], amax)


_LIB: torch.library.Library | None = None
_ORIGINAL_OP: Callable | None = None


def install() -> bool:
    """Make :func:`dynamic_block_quantize` the CPU kernel of ModelOpt's op (or, where ModelOpt
    could not register the op, wrap its Python fallback). Idempotent; True once installed."""
    global _LIB, _ORIGINAL_OP
    if is_installed():
        return True
    try:
        from modelopt.torch.quantization import tensor_quant as tq
    except ImportError:  # ModelOpt is a hard dependency; without it there is nothing to cover
        return False
    op = tq.dynamic_block_quantize_op
    if isinstance(op, torch._ops.OpOverloadPacket):
        lib = torch.library.Library("tensorrt", "IMPL")
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            lib.impl("dynamic_block_quantize_op", dynamic_block_quantize, "CPU")
        _LIB = lib  # the registration lives as long as this object
    else:
        _ORIGINAL_OP = op

        def cpu_or_cuda(inputs: Tensor, *args: Any) -> Tensor:
            return (op if inputs.is_cuda else dynamic_block_quantize)(inputs, *args)

        tq.dynamic_block_quantize_op = cpu_or_cuda
    return True


def uninstall() -> None:
    """Undo :func:`install`: the dispatcher falls back to the kernel registered before ours."""
    global _LIB, _ORIGINAL_OP
    if _LIB is not None:
        _LIB._destroy()
        _LIB = None
    if _ORIGINAL_OP is not None:
        from modelopt.torch.quantization import tensor_quant as tq

        tq.dynamic_block_quantize_op = _ORIGINAL_OP
        _ORIGINAL_OP = None


def is_installed() -> bool:
    return _LIB is not None or _ORIGINAL_OP is not None
