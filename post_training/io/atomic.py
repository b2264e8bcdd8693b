"""Atomic outputs: write into a hidden sibling, fsync, rename into place last.

The staging sibling of ``<parent>/<name>`` is ``<parent>/.<name>.tmp-<id>``: hidden, so nothing
that lists ``<parent>`` takes it for an output, and on the same filesystem, so the final rename
is atomic. A killed run leaves only such siblings; the next run towards the same target removes
them. An existing target directory is swapped out (renamed to a staging name of its own) and
removed after the new one is in place, never deleted first: the target path holds the old output
or the new one at every instant (between the two renames, neither; the old one is still on disk).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from post_training.utils import UsageError


def staging_path(target: Path) -> Path:
    """A fresh hidden sibling name for ``target`` (nothing is created)."""
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"


def remove_debris(parent: Path, names: str, keep: Path | None = None) -> list[Path]:
    """Remove the staging siblings (left by killed runs) of the targets in ``parent`` whose
    names match the regex ``names``; ``keep`` is spared. Returns what was removed."""
    pattern = re.compile(rf"\.(?:{names})\.tmp-[0-9a-f]+")
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p != keep and pattern.fullmatch(p.name):
                _remove(p)
                removed.append(p)
    return removed


def new_staging_dir(target: Path) -> Path:
    """An empty staging directory for ``target``, created after removing debris of killed runs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(target.parent, re.escape(target.name))
    staging = staging_path(target)
    staging.mkdir()
    return staging


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (or the file ``root``)."""
    if not root.is_dir():
        fsync_path(root)
        return
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def commit(staging: Path, target: Path) -> None:
    """fsync ``staging`` and rename it to ``target``: a file replaces an existing file atomically,
    an existing directory is swapped out first and removed after. The parent is fsynced last."""
    fsync_tree(staging)
    if target.is_dir() and not target.is_symlink():
        old = staging_path(target)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_path(target.parent)


def usual_permissions(root: Path) -> None:
    """``root`` and its files readable by other users, as the umask allows (safetensors and
    ``mkdtemp`` create owner-only files: a server under another uid could not read them)."""
    umask = os.umask(0o022)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~umask)


def check_output_dir(out: str | Path, overwrite: bool, what: str = "output dir") -> Path:
    """Refuse an output directory before any work starts (so a refusal costs nothing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{what} {out} is not empty (pass --overwrite to replace it)")
    return out


def check_output_file(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"output {out} is a directory; give a file name")
    if out.exists() and not overwrite:
        raise UsageError(f"output file {out} exists (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool, what: str = "output dir") -> Iterator[Path]:
    """Yield a staging directory for ``out``; on success it gets the usual permissions and
    replaces ``out``, on any error (or Ctrl-C) it is removed and ``out`` is left as it was."""
    out = check_output_dir(out, overwrite, what)
    staging = new_staging_dir(out)
    try:
        yield staging
        usual_permissions(staging)
        commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """The same contract for a single output file: yield a staging path to write, rename last."""
    out = check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(out.parent, re.escape(out.name))
    tmp = staging_path(out)
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
