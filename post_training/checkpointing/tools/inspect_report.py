"""The report ``inspect`` builds, and the checks both kinds of analyser share.

:class:`Report` collects one entry per file (its role; whether inference or resuming training
needs it; whether it is safe to edit by hand; whether loading it would run pickle code) and the
summary, while a kind-specific analyser (:mod:`post_training.checkpointing.tools.inspect_hf`,
:mod:`post_training.checkpointing.tools.inspect_sharded`) walks the layout. The helpers below read what both
sides need: a Hugging Face ``config.json``, the tokenizer files, the tensors of a state dict.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from post_training.io import layout as cio
from post_training.checkpointing.tools import inspect_readers as R
from post_training.checkpointing.tools import layouts as L
from post_training.utils import UsageError

SCHEMA = 1
# Scale/amax side tensors of quantized exports are not model parameters.
_NOT_PARAM = re.compile(r"(_scale|_scale_2|_amax|_quantizer\..*)$")


class Report:
    """Collects file entries and the summary while a kind-specific analyser walks the layout."""

    def __init__(self, lay: L.Layout) -> None:
        self.lay = lay
        self.files: dict[Path, dict[str, Any]] = {p: self._entry(p) for p in lay.files}
        self.architecture: str | None = None
        self.params: int | None = 0
        self.dtypes: Counter[str] = Counter()
        self.layout: dict[str, Any] = {"format": None, "tp": None, "pp": None, "dp": None,
                                       "zero_stage": None, "weight_files": 0, "ranks": None,
                                       "iteration": None}
        self.adapter: dict[str, Any] | None = None
        self.missing_resume: list[str] = []
        self.missing_deploy: list[str] = []
        self.problems: list[str] = []
        self.notes: list[str] = list(lay.notes)

    def _entry(self, p: Path) -> dict[str, Any]:
        root = self.lay.root
        inside = root.is_dir() and p.is_relative_to(root)
        role = L.file_role(p.relative_to(root) if inside else Path(p.name))
        e = {"path": _rel(p, root if root.is_dir() else root.parent), "role": role, "inference": False,
             "resume": False, "editable": False, "pickle": "none", "pickle_globals": [],
             "bytes": p.stat().st_size, "detail": ""}
        if p.suffix in (".pt", ".bin", ".pth", ".ckpt") and role != "tool script":
            e["pickle"], e["pickle_globals"] = R.pickle_check(p)
        self.set_role(p, role, e)
        return e

    def set_role(self, p: Path, role: str, e: dict | None = None, resume: bool | None = None) -> None:
        """Set a (possibly combined, ``a+b``) role and derive the flags: a file is needed for
        inference / resume if any of its parts is, and editable only if all are."""
        e = e if e is not None else self.files[p]
        flags = [L.ROLE_FLAGS[r] for r in role.split("+")]
        e["role"] = role
        e["inference"] = any(f[0] for f in flags)
        e["resume"] = any(f[1] for f in flags) if resume is None else resume
        e["editable"] = all(f[2] for f in flags)
        if p.name == cio.META:  # our own record: nothing reads it to run, the loader checks it
            e["inference"] = e["resume"] = False

    def of_role(self, *roles: str) -> list[Path]:
        return [p for p, e in self.files.items() if any(r in e["role"].split("+") for r in roles)]

    def add_tensors(self, tensors: dict[str, tuple[list[int], str]],
                    multiplier: Callable[[str], int] | None = None) -> None:
        """Count parameters and dtypes of ``{name: (shape, dtype)}`` (unless already unknown)."""
        if self.params is None:
            return
        for name, (shape, dtype) in tensors.items():
            if _NOT_PARAM.search(name):
                continue
            n = 1
            for s in shape:
                n *= int(s)
            n *= multiplier(name) if multiplier else 1
            self.params = (self.params or 0) + n
            self.dtypes[dtype] += n

    def unknown_params(self, why: str) -> None:
        self.params = None
        self.notes.append(f"parameter count unknown: {why}")

    def to_dict(self) -> dict[str, Any]:
        files = sorted(self.files.values(), key=lambda e: e["path"])
        return {
            "schema": SCHEMA,
            "path": str(self.lay.root),
            "kind": self.lay.kind,
            "description": self.lay.description,
            "architecture": self.architecture,
            "parameters": self.params,
            "dtypes": dict(sorted(self.dtypes.items(), key=lambda kv: -kv[1])),
            "total_bytes": sum(e["bytes"] for e in files),
            "layout": self.layout,
            "adapter": self.adapter,
            "missing": {"resume": self.missing_resume, "deploy": self.missing_deploy},
            "problems": self.problems,
            "notes": self.notes,
            "files": files,
        }


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(Path("..") / p.relative_to(base.parent))


def short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: not readable JSON ({e})") from None



# ----------------------------------------------------------------------------- shared checks
def hf_config(rep: Report, cfg_path: Path) -> dict:
    if not cfg_path.is_file():
        return {}
    cfg = read_json(cfg_path)
    arch = (cfg.get("architectures") or [None])[0]
    rep.architecture = f"{arch} ({cfg.get('model_type')})" if arch else cfg.get("model_type")
    if cfg.get("quantization_config"):
        rep.notes.append(f"quantized: {cfg['quantization_config'].get('quant_method', '?')}")
    return cfg



def dedup(tensors: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, dtype)}``, counting a storage view shared by tied weights once."""
    out, seen = {}, set()
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = (list(t.shape), str(t.dtype).replace("torch.", ""))
    return out



def tokenizer_checks(rep: Report, where: str = "") -> None:
    names = {p.name for p in rep.of_role("tokenizer")}
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"}:
        rep.missing_deploy.append(f"tokenizer{where}")
    if not names:
        return
    templates = rep.of_role("chat template")
    tok_cfg = next((p for p in rep.of_role("tokenizer") if p.name == "tokenizer_config.json"), None)
    if not templates and not (tok_cfg and read_json(tok_cfg).get("chat_template")):
        rep.notes.append("no chat template: chat prompts cannot be rendered")

