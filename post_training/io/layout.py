"""Filesystem side of checkpoints: Megatron-LM's layout, atomic commit, rotation, integrity.

Layout (what Megatron-LM and its tools expect)::

    <save>/latest_checkpointed_iteration.txt   "100" (or "release")
    <save>/iter_0000100/                        megatron-core dist checkpoint (torch_dist):
        common.pt  *.distcp  .metadata  metadata.json (megatron-core's own backend record)
        modelopt_state/                         ModelOpt's sharded sub-checkpoint, when converted
        toolkit_meta.json                       ours: what this is, for people and tools
    <save>/hf_config/                           config.json + tokenizer of the model

megatron-core owns ``metadata.json`` inside the checkpoint (it reads it back into a dataclass
and rejects unknown keys), so our human-readable record is ``toolkit_meta.json``.

A save goes to a hidden sibling ``.iter_0000100.tmp-<id>``; it is fsynced and renamed into
place, and the tracker is replaced (write, fsync, rename) last, all by :mod:`.atomic`. A process
killed at any point leaves the previous checkpoint and tracker untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from post_training.io import atomic
from post_training.io.formats import sha256_file
from post_training.utils import UsageError

TRACKER = "latest_checkpointed_iteration.txt"
META = "toolkit_meta.json"
HF_CONFIG_DIR = "hf_config"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
_STAGED = r"iter_\d{7}|release"  # the targets whose staging siblings a save removes


def iter_dir_name(iteration: int | None) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def is_dist_checkpoint_dir(path: Path) -> bool:
    """An iteration directory written by megatron-core dist_checkpointing."""
    return (path / "metadata.json").is_file() and (path / "common.pt").is_file()


def is_checkpoint_root(path: Path) -> bool:
    return (path / TRACKER).is_file()


def read_tracker(root: Path) -> Path:
    """The iteration directory the tracker points to."""
    text = (root / TRACKER).read_text().strip()
    if text == "release":
        name = "release"
    elif text.isdigit():
        name = iter_dir_name(int(text))
    else:
        raise UsageError(f"{root / TRACKER} is not an iteration number or 'release': {text[:40]!r}")
    path = root / name
    if not path.is_dir():
        raise UsageError(f"{root / TRACKER} points to {name}, which does not exist in {root}")
    return path


def find_checkpoint(path: str | Path) -> Path:
    """Resolve ``--load``: a save root (tracker) or one iteration directory."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"checkpoint path not found: {p}")
    if is_checkpoint_root(p):
        it = read_tracker(p)
    elif is_dist_checkpoint_dir(p):
        it = p
    else:
        raise UsageError(f"{p} is not a checkpoint: no {TRACKER} and no dist-checkpoint files")
    if not is_dist_checkpoint_dir(it):
        raise UsageError(f"{it} is not a complete dist checkpoint (metadata.json or common.pt missing)")
    return it


def checkpoint_root(iter_dir: Path) -> Path:
    return iter_dir.parent


def new_staging_dir(root: Path, name: str) -> Path:
    """The staging path (not created) of iteration directory ``name``."""
    return atomic.staging_path(root / name)


def remove_stale_staging(root: Path, keep: Path | None = None) -> list[Path]:
    """Remove leftovers of saves that never committed (killed processes)."""
    return atomic.remove_debris(root, _STAGED, keep)


def file_records(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``root`` (except our own record)."""
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != META}


def write_meta(iter_dir: Path, meta: dict) -> None:
    meta = {**meta, "files": file_records(iter_dir)}
    tmp = iter_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, iter_dir / META)


def read_meta(iter_dir: Path) -> dict:
    p = iter_dir / META
    if not p.is_file():
        return {}  # a plain Megatron-LM checkpoint: no record of ours
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{p} is corrupt: {e}") from None


def verify_files(iter_dir: Path, meta: dict, hashes: bool = True) -> None:
    """Every file recorded at save time is present with the same size (and hash)."""
    for rel, rec in meta.get("files", {}).items():
        p = iter_dir / rel
        if not p.is_file():
            raise UsageError(f"checkpoint {iter_dir} is incomplete: {rel} is missing")
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise UsageError(
                f"checkpoint shard {iter_dir / rel} is truncated or altered: {size} bytes, "
                f"{rec['bytes']} when saved"
            )
    if hashes:
        now = file_records(iter_dir)
        for rel, rec in meta.get("files", {}).items():
            if now[rel]["sha256"] != rec["sha256"]:
                raise UsageError(f"checkpoint shard {iter_dir / rel} is corrupt (sha256 differs from save)")


def write_tracker(root: Path, iteration: int | None) -> None:
    tmp = root / (TRACKER + ".tmp")
    tmp.write_text("release" if iteration is None else str(iteration))
    atomic.commit(tmp, root / TRACKER)


def commit(staging: Path, root: Path, iteration: int | None) -> Path:
    """Move a finished save into place (fsynced; re-saving an iteration swaps, never deletes
    first), then point the tracker at it."""
    final = root / iter_dir_name(iteration)
    atomic.commit(staging, final)
    write_tracker(root, iteration)
    return final


def list_iterations(root: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _ITER_RE.match(p.name)))


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` iterations; never the one the tracker names."""
    if keep_last < 1:
        raise UsageError(f"keep-last must be >= 1 (got {keep_last})")
    protected = read_tracker(root).name if is_checkpoint_root(root) else None
    removed = []
    for it in list_iterations(root)[:-keep_last]:
        p = root / iter_dir_name(it)
        if p.name != protected:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
