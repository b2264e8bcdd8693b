"""Placeholder while this command is being written (replaced by its owner)."""
from __future__ import annotations

from post_training.utils import UsageError


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    raise UsageError(f"command {args.command} is not implemented yet")
