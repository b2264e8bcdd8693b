"""The collective patterns the toolkit uses, each written once.

Tensors travel on the runtime's device (nccl needs CUDA tensors, gloo CPU ones). Every helper is
a no-op without a process group, so library code calls them unconditionally.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from post_training.utils import UsageError, rank

T = TypeVar("T")


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def comm_device() -> torch.device:
    """Where collective tensors live: the runtime's device, else CUDA when present, else CPU."""
    from post_training.runtime.dist import _RUNTIME

    if _RUNTIME is not None:
        return _RUNTIME.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _pp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """In place: every pipeline stage gets the last stage's ``t`` (same shape and dtype on all)."""
    if _initialized() and _pp_size() > 1:
        from megatron.core import parallel_state as ps

        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return t


def broadcast_object_from_last_stage(obj: T) -> T:
    """A picklable object from the last pipeline stage to every stage of this pipeline."""
    if not (_initialized() and _pp_size() > 1):
        return obj
    from megatron.core import parallel_state as ps

    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]


def pp_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``t`` over this rank's pipeline group (each stage fills its part,
    zeros elsewhere, and every stage gets the whole)."""
    if _initialized() and _pp_size() > 1:
        from megatron.core import parallel_state as ps

        dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return t


def broadcast_from_first_stage(t: torch.Tensor) -> torch.Tensor:
    """In place: every pipeline stage gets the first stage's ``t``."""
    if _initialized() and _pp_size() > 1:
        from megatron.core import parallel_state as ps

        dist.broadcast(t, src=ps.get_pipeline_model_parallel_first_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return t


def dp_sum(t: torch.Tensor) -> torch.Tensor:
    """In place: the sum of ``t`` over the data-parallel group."""
    from megatron.core import parallel_state as ps

    if _initialized() and ps.model_parallel_is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_data_parallel_group())
    return t


def last_stage_dp_sum(t: torch.Tensor) -> torch.Tensor:
    """Every rank gets the sum over DP ranks of the last pipeline stage's ``t``."""
    return dp_sum(broadcast_from_last_stage(t))


def tp_all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The tensor-parallel shards of ``t`` concatenated along ``dim`` in TP-rank order, on every
    rank of the TP group (``t`` itself at TP=1)."""
    from megatron.core import parallel_state as ps

    if not (_initialized() and ps.model_parallel_is_initialized()):
        return t
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    src = t.detach().contiguous().to(comm_device())
    parts = [torch.empty_like(src) for _ in range(tp)]
    dist.all_gather(parts, src, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim).to(t.device)


def broadcast_object(obj: T, src: int = 0) -> T:
    """A picklable object from global rank ``src`` to every rank."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank0_then_share(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on global rank 0 only and make every rank fail alike when it fails, so no rank
    is left waiting in a later collective: a UsageError arrives as itself, anything else as a
    RuntimeError with its message (rank 0 raises the original). Returns ``fn``'s result on rank 0,
    None elsewhere."""
    result, err, shared = None, None, None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, on every rank
            err, shared = e, (isinstance(e, UsageError), str(e))
    shared = broadcast_object(shared)
    if err is not None:
        raise err
    if shared is not None:
        raise (UsageError if shared[0] else RuntimeError)(shared[1])
    return result


__all__ = ["broadcast_from_first_stage", "broadcast_from_last_stage", "pp_sum", "broadcast_object_from_last_stage", "broadcast_object", "comm_device", "dp_sum", "gather_objects",
           "last_stage_dp_sum", "rank0_then_share"]
