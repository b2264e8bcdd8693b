"""Small helpers shared by every module: rank-aware printing, the user-error type and the
one-line error contract of entry points, a free port for private rendezvous."""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable, NoReturn

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


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (a private rendezvous for one process or a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_main(main: Callable[[list[str]], int | None], argv: list[str] | None = None,
             on_exit: Callable[[], None] | None = None) -> NoReturn:
    """Run ``main(argv)`` and exit with its code; a UsageError becomes one ``error:`` line on
    stderr (printed once, by rank 0 of a torchrun job) and exit code 2. ``on_exit`` runs last
    either way (an entry's teardown)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = main(argv) or 0
    except UsageError as e:
        if rank() == 0 and os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    finally:
        if on_exit is not None:
            on_exit()
    sys.exit(code)
