"""Process groups, device choice, seeding and memory reports."""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from post_training.config import ParallelConfig
from post_training.runtime import cpu_compat, patches
from post_training.utils import UsageError, free_port

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


@dataclass
class Runtime:
    device: torch.device
    backend: str
    rank: int
    local_rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    cpu_compat: bool  # the CPU shims are active (CPU without CUDA, unless PT_NO_CPU_COMPAT=1)

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def tp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def pp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_rank()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


_RUNTIME: Runtime | None = None


def _resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was requested (--device cuda) but torch.cuda.is_available() is False")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_runtime(cfg: ParallelConfig) -> Runtime:
    """Join (or create) the process group and initialise megatron-core's parallel state.

    Works unchanged under ``python`` (one rank: a private rendezvous is made up),
    ``torchrun --nproc-per-node N`` and multi-node torchrun.
    """
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])

    if world % (cfg.tp * cfg.pp) != 0:
        raise UsageError(
            f"world size {world} is not divisible by TP*PP = {cfg.tp}*{cfg.pp}; "
            f"launch TP*PP*DP ranks"
        )
    device = _resolve_device(cfg.device, local_rank)
    # Every change to upstream behaviour, for this device (post_training/runtime/patches.py).
    patches.apply_runtime(device.type, torch.cuda.is_available())
    compat = cpu_compat.is_applied()
    # On CPU torch.cuda.is_available() is False, so megatron-core never asks for nccl.
    backend = BACKENDS[device.type]
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=int(os.environ.get("PT_DIST_TIMEOUT_MIN", "30"))),
            device_id=device if device.type == "cuda" else None,
        )
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp
        )
    _RUNTIME = Runtime(
        device=device,
        backend=backend,
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        tp=cfg.tp,
        pp=cfg.pp,
        dp=world // (cfg.tp * cfg.pp),
        cpu_compat=compat,
    )
    seed_everything(cfg.seed)
    return _RUNTIME


def seed_everything(seed: int) -> None:
    """Same seed on every TP rank (identical replicated params); megatron's tracker gives
    TP regions their own stream. PP stages differ, as in Megatron's _set_random_seed."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    model_parallel_cuda_manual_seed(seed)
    # model_parallel_cuda_manual_seed leaves the "cuda" generator (the CPU one under the
    # shims) on the data-parallel seed; start the default stream from `seed` again.
    torch.manual_seed(seed)


def get_runtime() -> Runtime:
    if _RUNTIME is None:
        raise RuntimeError("init_runtime() has not been called")
    return _RUNTIME


def destroy_runtime() -> None:
    global _RUNTIME
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _RUNTIME = None


def memory_report(tag: str = "") -> str:
    """One line: CUDA allocated/peak when on GPU, and process RSS (current, peak)."""
    import resource

    import psutil

    parts = [tag] if tag else []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(
            f"cuda alloc {torch.cuda.memory_allocated() / 2**30:.2f} GiB "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )
    rss = psutil.Process().memory_info().rss / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    parts.append(f"rss {rss:.2f} GiB peak {peak:.2f} GiB")
    return " | ".join(parts)


def have_te() -> bool:
    """Transformer Engine imports (it raises more than ImportError when CUDA is missing)."""
    try:
        import transformer_engine  # noqa: F401

        return True
    except Exception:
        return False
