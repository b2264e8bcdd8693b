"""Small helpers shared by every module: rank-aware printing and the user-error type."""
from __future__ import annotations

import sys

import torch.distributed as dist


class UsageError(Exception):
    """A bad input from the user. Entry points print it as one line and exit with 2."""


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def print_rank_0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def warn_rank_0(msg: str) -> None:
    if rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def unwrap(model):
    """The GPTModel inside megatron-core's DDP / Float16Module wrappers (they hold it as
    ``.module`` and do not forward ``sharded_state_dict``)."""
    while hasattr(model, "module"):
        model = model.module
    return model
