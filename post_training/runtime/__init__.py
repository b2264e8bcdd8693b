"""The runtime layer: devices, process groups, seeds, memory reports and CPU shims.

Everything that differs between one CPU process, N CPU ranks over gloo and N GPUs
over nccl is decided here; the rest of the toolkit asks :func:`get_runtime`.
"""
from post_training.runtime.dist import (
    ParallelConfig,
    Runtime,
    destroy_runtime,
    get_runtime,
    init_runtime,
    memory_report,
)

__all__ = [
    "ParallelConfig",
    "Runtime",
    "destroy_runtime",
    "get_runtime",
    "init_runtime",
    "memory_report",
]
