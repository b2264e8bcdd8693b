"""What quantization did, in a few lines: quantizers counted by format and module kind (the
disabled ones named by pattern), and the weights' size at the target format. ModelOpt's full
per-quantizer table is one line per quantizer (453 for SmolLM2); it goes to ``--verbose`` or
into the checkpoint directory."""
from __future__ import annotations

import contextlib
import io
import re
from collections import Counter, defaultdict

from post_training.runtime.collectives import gather_objects

_FLOATS = {(4, 3): "fp8 e4m3", (5, 2): "fp8 e5m2", (2, 1): "fp4 e2m1", (3, 2): "fp6 e3m2", (2, 3): "fp6 e2m3"}


def _bits(num_bits) -> int:
    """ModelOpt's num_bits: an int, or (exponent, mantissa) bits of a float format plus sign."""
    return 1 + sum(num_bits) if isinstance(num_bits, (tuple, list)) else int(num_bits)


def describe(q) -> str:
    """'fp8 e4m3 per-tensor', 'int4 block 128', 'int8 per-channel', ... of a TensorQuantizer."""
    nb = tuple(q.num_bits) if isinstance(q.num_bits, (tuple, list)) else q.num_bits
    fmt = _FLOATS.get(nb, f"int{nb}" if isinstance(nb, int) else f"fp{_bits(nb)}")
    blocks = q.block_sizes or {}
    block = next((v for k, v in blocks.items() if isinstance(k, int)), None)
    if block:
        return f"{fmt} block {block}" + (" dynamic" if blocks.get("type") == "dynamic" else "")
    return f"{fmt} {'per-tensor' if q.axis is None else 'per-channel'}"


def quantizer_rows(model) -> list[tuple[str, bool, str]]:
    """(name, enabled, format) of every TensorQuantizer of this rank's stage."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [(n, m.is_enabled, describe(m) if m.is_enabled else "off")
            for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def condensed_summary(rows: list[tuple[str, bool, str]], max_patterns: int = 6) -> list[str]:
    """A few lines instead of one per quantizer: enabled ones by (format, role) with the module
    kinds they sit in, disabled ones by name pattern (layer numbers replaced by *)."""
    on: dict[tuple[str, str], Counter] = defaultdict(Counter)
    off: Counter = Counter()
    for name, enabled, fmt in rows:
        parts = name.split(".")
        role, kind = parts[-1], (parts[-2] if len(parts) > 1 else "model")
        if enabled:
            on[(fmt, role)][kind] += 1
        else:
            off[_pattern(name)] += 1
    n_on = sum(sum(c.values()) for c in on.values())
    lines = [f"quantizers: {len(rows)} ({n_on} on, {len(rows) - n_on} off)"]
    for (fmt, role), kinds in sorted(on.items()):
        where = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        lines.append(f"  {fmt:<22} {role:<18} x{sum(kinds.values()):<4} {where}")
    # Patterns that differ only in the module name collapse further: *.linear_qkv.output_quantizer
    # and friends become one '*.output_quantizer' line when there are many.
    shown = off.most_common()
    if len(shown) > max_patterns:
        by_role: Counter = Counter()
        for pat, n in shown:
            by_role["*." + pat.split(".")[-1]] += n
        shown = by_role.most_common()
    for pat, n in shown[:max_patterns]:
        lines.append(f"  {'off':<22} {pat:<40} x{n}")
    if len(shown) > max_patterns:
        lines.append(f"  {'off':<22} ({len(shown) - max_patterns} more patterns)")
    return lines


def model_summary_lines(model) -> list[str]:
    """:func:`condensed_summary` of the whole model (every pipeline stage; TP ranks hold the
    same names). Collective."""
    seen, rows = set(), []
    for part in gather_objects(quantizer_rows(model)):
        for row in part:
            if row[0] not in seen:
                seen.add(row[0])
                rows.append(row)
    return condensed_summary(rows)


def full_table(model) -> str:
    """ModelOpt's own per-quantizer summary of this rank's stage, as text."""
    import modelopt.torch.quantization as mtq

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mtq.print_quant_summary(model)
    return buf.getvalue()


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of this stage's parameters stored at their quantized formats, bytes unquantized).
    A quantized weight counts its format's bits per element plus one block scale per block
    (scale format's bits, 16 when unstated); per-tensor / per-channel scales are left out
    (under 0.1%); every other parameter counts at its own dtype. Shared (tied) tensors once."""
    seen, quantized, plain = set(), 0, 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            plain += size
            q = getattr(mod, "weight_quantizer", None) if name == "weight" else None
            if q is None or not q.is_enabled or q.num_bits is None:
                quantized += size
                continue
            bits = p.numel() * _bits(q.num_bits)
            blocks = q.block_sizes or {}
            block = next((v for k, v in blocks.items() if isinstance(k, int)), None)
            if block:
                bits += p.numel() // block * _bits(blocks.get("scale_bits") or 16)
            quantized += bits // 8
    return quantized, plain
