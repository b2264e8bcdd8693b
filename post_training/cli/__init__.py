"""Entry points run by scripts/*.sh (``python -m post_training.cli.<task>``).

Each task parses flags, validates what it can before touching process groups (so
``--preflight`` can reject bad input before torchrun starts N ranks), then runs.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

# Import-time notices of megatron-core / ModelOpt that say nothing actionable to a user of
# this toolkit (we choose the local spec on purpose). Installed before those imports run.
for _msg in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"transformers .* is not tested with current version of modelopt",
    r"tp_group is None",
    r"full scope is deprecated",  # TransformerConfig's own default, not something we set
):
    warnings.filterwarnings("ignore", message=_msg)

from post_training.utils import UsageError, rank  # noqa: E402


def run_entry(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run ``main``; a UsageError becomes one line on stderr (rank 0) and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv) or 0
    except UsageError as e:
        if rank() == 0 and os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        from post_training.runtime import destroy_runtime

        try:
            destroy_runtime()
        except Exception:
            pass
    sys.exit(code)


def split_preflight(argv: list[str]) -> tuple[bool, list[str]]:
    return "--preflight" in argv, [a for a in argv if a != "--preflight"]
