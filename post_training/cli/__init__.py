"""Entry points run by scripts/*.sh (``python -m post_training.cli.<task>``).

Each task parses flags, validates what it can before touching process groups (so
``--preflight`` can reject bad input before torchrun starts N ranks), then runs.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch.distributed as dist

from post_training.utils import UsageError, rank


def run_entry(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run ``main``; a UsageError becomes one line on stderr (rank 0) and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    # A runtime that existed before this call (a test's, a notebook's) is not ours to tear down.
    had_runtime = dist.is_available() and dist.is_initialized()
    try:
        code = main(argv) or 0
    except UsageError as e:
        if rank() == 0 and os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        # Only entries that set up a runtime have one to tear down; the checkpoint tools never
        # import it (it pulls in megatron-core, seconds of start-up for `ckpt inspect`).
        if not had_runtime and "post_training.runtime" in sys.modules:
            try:
                sys.modules["post_training.runtime"].destroy_runtime()
            except Exception:
                pass
    sys.exit(code)


def split_preflight(argv: list[str]) -> tuple[bool, list[str]]:
    return "--preflight" in argv, [a for a in argv if a != "--preflight"]
