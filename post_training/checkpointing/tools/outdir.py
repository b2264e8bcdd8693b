"""Output directories for the checkpoint tools: refuse to clobber, stage, then rename into place."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from post_training.io.export_files import commit, new_staging_dir
from post_training.utils import UsageError


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Validate an output path before any work starts (so a refusal costs nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"output dir {out} is not empty (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden staging directory beside ``out``; on success it replaces ``out``, on any
    error (or Ctrl-C) it is removed and ``out`` is left exactly as it was."""
    out = check_output(out, overwrite)
    staging = new_staging_dir(out)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit(staging, out, overwrite)


@contextlib.contextmanager
def staged_file(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Same contract for a single output file (GGUF): write to a hidden sibling, rename last."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise UsageError(f"output file {out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    try:
        yield tmp
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
