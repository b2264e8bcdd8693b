"""The one way this toolkit reads pickle-based weight files (``.pt``, ``.bin``, ``.pth``).

``torch.load(weights_only=True)`` only rebuilds tensors and plain containers, so a malicious
file cannot run code. A file that needs other globals (an ``argparse.Namespace`` in Megatron's
legacy checkpoints, a custom class) is refused with the names of the globals it asked for,
unless the caller passes ``trust_pickle=True`` (``--trust-pickle`` on the command line).
"""
from __future__ import annotations

import contextlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from post_training.io.formats import sha256_file
from post_training.utils import UsageError, warn_rank_0


@contextlib.contextmanager
def only_globals(allow: Iterable[Any] = ()) -> Iterator[None]:
    """Make ``weights_only`` admit exactly torch's defaults plus ``allow`` while active.
    Libraries register their own classes process-wide (megatron-core adds ``PosixPath``,
    ``Namespace``, ``BytesIO``, numpy arrays once its checkpointing is imported), so without this
    the same file would be refused in a fresh process and accepted after megatron ran."""
    ser = torch.serialization
    saved = ser.get_safe_globals()
    ser.clear_safe_globals()
    ser.add_safe_globals(list(allow))
    try:
        yield
    finally:
        ser.clear_safe_globals()
        ser.add_safe_globals(saved)


def unsafe_globals(path: str | Path, allow: Iterable[Any] = ()) -> list[str]:
    """Globals a zip-format torch file references beyond what ``weights_only`` (+ ``allow``) admits."""
    try:
        with only_globals(allow):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format, or unreadable: the load itself will say more
        return []


def safe_torch_load(path: str | Path, trust_pickle: bool = False, mmap: bool = True,
                    allow: Iterable[Any] = ()) -> Any:
    """Load a torch pickle file on CPU without executing code unless ``trust_pickle``.

    ``allow``: extra classes known to be harmless to rebuild (e.g. ``argparse.Namespace``).
    ``mmap`` maps zip-format files instead of reading them, so converting a large file needs
    little more memory than its largest tensor; legacy-format files are read normally.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    mmap = mmap and zipfile.is_zipfile(path)
    allow = list(allow)
    try:
        with only_globals(allow):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        names = unsafe_globals(path, allow)
        if not names and "GLOBAL" in str(e):
            names = [_global_from_message(str(e))]
        if not names:  # not a globals problem: the bytes are not a torch pickle at all
            raise UsageError(f"{path} is not a readable torch file ({_first_line(e)})") from None
        if not trust_pickle:
            raise UsageError(
                f"{path} needs pickle globals {', '.join(names)} to load; loading it could run code "
                "from the file (pass --trust-pickle only if you trust where it came from)"
            ) from None
        warn_rank_0(f"{path}: loading with full pickle (--trust-pickle): globals {', '.join(names)}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        except Exception as e2:  # noqa: BLE001 - any failure of a trusted unpickle is the file's
            raise UsageError(f"{path} is not a readable torch file ({_first_line(e2)})") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, garbage bytes (KeyError, EOFError, ...)
        raise UsageError(f"{path} is not a readable torch file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _global_from_message(msg: str) -> str:
    # torch's message reads "... Unsupported global: GLOBAL foo.Bar was not an allowed global ..."
    for line in msg.splitlines():
        if "GLOBAL" in line:
            return line.split("GLOBAL", 1)[1].split()[0]
    return "<unknown>"


def write_sha256sums(root: Path, names: list[str] | None = None) -> Path:
    """``SHA256SUMS`` in ``sha256sum -c`` format for the given files (default: all files)."""
    names = sorted(names if names is not None else [p.name for p in root.iterdir() if p.is_file()])
    lines = [f"{sha256_file(root / n)}  {n}" for n in names if n != "SHA256SUMS"]
    out = root / "SHA256SUMS"
    out.write_text("\n".join(lines) + "\n")
    return out
