"""``inspect DIR_OR_FILE [--json]``: what a checkpoint is, file by file, without running its code.

For every file: its role, whether inference or resuming training needs it, whether it is safe to
edit by hand, and whether loading it would run pickle code. For the whole: the kind, the
architecture, parameter count, dtypes, size, parallel layout, and what is missing to resume or
to deploy. Layout recognition lives in :mod:`post_training.checkpointing.tools.layouts`, the readers in
:mod:`post_training.checkpointing.tools.inspect_readers`, the report in :mod:`post_training.checkpointing.tools.inspect_report`
and the analysers per kind in :mod:`post_training.checkpointing.tools.inspect_hf` and
:mod:`post_training.checkpointing.tools.inspect_sharded`; this module runs them and renders the result.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from post_training.checkpointing.tools import inspect_hf as H
from post_training.checkpointing.tools import inspect_sharded as S
from post_training.checkpointing.tools import layouts as L
from post_training.checkpointing.tools.inspect_report import Report

_PICKLE_TEXT = {"none": "-", "weights_only": "safe", "legacy_unchecked": "pickle (legacy format, cannot check)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="DIR_OR_FILE", help="checkpoint directory or single file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def run(args: argparse.Namespace) -> int:
    report = inspect_path(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0



_ANALYSERS: dict[str, Callable[[Report], None]] = {
    "toolkit-dist": S.analyse_megatron_dist,
    "megatron-dist": S.analyse_megatron_dist,
    "megatron-legacy": S.analyse_megatron_legacy,
    "torch-dcp": S.analyse_dcp,
    "hf-model": H.analyse_hf,
    "peft-adapter": H.analyse_peft,
    "hf-trainer": H.analyse_trainer,
    "deepspeed": S.analyse_deepspeed,
    "gguf": H.analyse_gguf,
    "safetensors-file": H.analyse_file,
    "torch-file": H.analyse_file,
}


def inspect_path(path: str | Path) -> dict[str, Any]:
    """The report for ``path`` as a JSON-ready dict (stable keys, see :class:`Report`)."""
    lay = L.detect(path)
    rep = Report(lay)
    _ANALYSERS[lay.kind](rep)
    return rep.to_dict()



# ----------------------------------------------------------------------------- rendering
def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""


def _params_text(n: int | None) -> str:
    if n is None:
        return "unknown"
    scaled = next(((n / d, u) for d, u in ((1e9, "B"), (1e6, "M")) if n >= d), None)
    return f"{n:,}" + (f" ({scaled[0]:.2f}{scaled[1]})" if scaled else "")


def pickle_text(e: dict) -> str:
    """The PICKLE column: ``-`` (not a pickle), ``safe`` (weights_only), or what would run."""
    if e["pickle"] != "needs_globals":
        return _PICKLE_TEXT[e["pickle"]]
    g = e["pickle_globals"]
    if all(n.startswith("torch.distributed.checkpoint.") or n == "torch.serialization._get_layout"
           or (n.startswith("torch.") and n.count(".") == 1) for n in g):
        return "pickle.load: DCP classes only"  # DCP's .metadata, checked by the restricted reader
    text = "RUNS CODE: " + g[0]
    return text + (f" +{len(g) - 1} more" if len(g) > 1 else "")


def render(rep: dict) -> str:
    """The compact table (one line per file) and the summary block."""
    yn = {True: "yes", False: "no"}
    rows = [("FILE", "ROLE", "INFER", "RESUME", "EDIT", "PICKLE", "SIZE")]
    rows += [(e["path"], e["role"], yn[e["inference"]], yn[e["resume"]], yn[e["editable"]], pickle_text(e),
              human_bytes(e["bytes"])) for e in rep["files"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"{rep['path']}: {rep['description']}", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1].rjust(9) for r in rows]
    lay = rep["layout"]
    parts = [f"{k}={lay[k]}" for k in ("tp", "pp", "dp", "zero_stage", "ranks", "weight_files", "iteration")
             if lay.get(k) is not None]
    params = rep["parameters"]
    summary = [
        ("kind", rep["kind"]),
        ("architecture", rep["architecture"] or "unknown"),
        ("parameters", _params_text(params)),
        ("dtypes", ", ".join(f"{d} ({n:,})" for d, n in rep["dtypes"].items()) or "unknown"),
        ("total size", f"{human_bytes(rep['total_bytes'])} in {len(rep['files'])} files"),
        ("layout", f"{lay['format']}" + (": " + ", ".join(parts) if parts else "")),
    ]
    if rep["adapter"]:
        summary.append(("adapter", ", ".join(f"{k}={v}" for k, v in rep["adapter"].items())))
    for what in ("resume", "deploy"):
        miss = rep["missing"][what]
        summary.append((f"to {what}", "missing: " + "; ".join(miss) if miss else "nothing missing"))
    summary += [("PROBLEM", p) for p in rep["problems"]] + [("note", n) for n in rep["notes"]]
    lines.append("")
    lines += [f"{k:<13}{v}" for k, v in summary]
    return "\n".join(lines)
