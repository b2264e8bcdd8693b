"""CPU compatibility layer for megatron-core and ModelOpt.

Both libraries assume CUDA in a number of places. Rather than patching each call
site, we (1) give the few ``torch.cuda`` query functions they call a CPU answer and
(2) push a :class:`torch.overrides.TorchFunctionMode` that rewrites any CUDA device
argument (``device="cuda"``, ``device=0``, ``.cuda()``, ``.to("cuda")``) to CPU.

Everything here is applied by :func:`apply` only when CUDA is absent, and only once.
Each entry in :data:`SHIMS` names the upstream call sites it covers; the list is
printed by ``python -m post_training.runtime`` and checked by tests/test_runtime.py.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from post_training.runtime import block_quant_cpu

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Shim:
    name: str
    covers: str  # upstream call sites, for people reading the list


SHIMS: list[Shim] = [
    Shim("torch.cuda.current_device -> torch.device('cpu') (a valid device argument even "
         "while the device mode is suspended)",
         "megatron-core rotary_pos_embedding.get_emb/RotaryEmbedding.__init__, "
         "utils.GlobalMemoryBuffer.get_tensor, dist_checkpointing save_state_dict_async_finalize, "
         "~175 other current_device() calls"),
    Shim("torch.cuda.synchronize -> no-op",
         "modelopt.torch.opt.plugins.megatron _modelopt_get_extra_state; timers"),
    Shim("torch.cuda.mem_get_info -> (available RAM, total RAM)",
         "modelopt.torch.utils.plugins.megatron_generate; memory reports"),
    Shim("torch.cuda.manual_seed/_all, get_rng_state/set_rng_state -> CPU generator",
         "megatron-core tensor_parallel.random.model_parallel_cuda_manual_seed, "
         "CudaRNGStatesTracker.fork, checkpoint RNG state"),
    Shim("TorchFunctionMode: device='cuda'|int|torch.device('cuda') -> 'cpu'; "
         "Tensor.cuda() -> self; Tensor.to('cuda') -> cpu",
         "megatron-core schedules.forward_backward_no_pipelining (torch.zeros(device='cuda')), "
         "optimizer.FP32Optimizer (torch.tensor(..., device='cuda')), "
         "transformer.dot_product_attention buffers, tensor_parallel mappings, .cuda() calls"),
    Shim("TorchFunctionMode: Tensor.type() names a CPU tensor by its CUDA type "
         "('torch.cuda.FloatTensor'); Tensor.type('torch.cuda.X') converts to 'torch.X'",
         "megatron-core optimizer.clip_grads.clip_grad_by_total_norm_fp32 "
         "(assert param.grad.type() == 'torch.cuda.FloatTensor'), "
         "optimizer.Float16OptimizerWithFloat16Params and distrib_optimizer "
         "(param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'])"),
    Shim("ModelOpt dynamic block quantization (NVFP4, MXFP8/MXFP6/MXFP4/MXINT8) -> plain-torch "
         "emulation of its CUDA/Triton kernels, same rounding (runtime/block_quant_cpu.py)",
         "modelopt.torch.quantization.tensor_quant._dynamic_block_quantize_impl, the CPU kernel of "
         "torch.ops.tensorrt.dynamic_block_quantize_op ('amax must be a CUDA tensor for dynamic "
         "block quantization' for NVFP4; get_cuda_ext_mx().fused_amax_convert for MX), reached "
         "from TensorQuantizer._fake_quantize via DynamicBlockQuantizationFunction"),
    Shim("MKL VML warm-up: torch's VML-backed float functions (cos, sin, exp, ...) run once on "
         "one thread at start-up, before any multi-threaded call",
         "torch.cos of megatron's rotary table: in 3 of ~90 fresh processes under CPU load "
         "the first 2-thread vmsCos returned enhanced-performance (EP, ~1.5e-4) instead of the "
         "requested high-accuracy results on the main thread's half of the table"),
]

_applied = False
_mode: TorchFunctionMode | None = None


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int means "CUDA device N" to torch factory functions.
    return isinstance(dev, int) and not isinstance(dev, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to CPU."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type:
            return _cuda_type_name(*args, **kwargs)
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(state)


def _mem_get_info(device: Any = None) -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def apply() -> bool:
    """Install the shims when CUDA is absent. Returns True when they are active."""
    global _applied, _mode
    if _applied:
        return True
    if torch.cuda.is_available() or os.environ.get("POST_TRAINING_NO_CPU_COMPAT") == "1":
        return False
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda device=None: None
    cuda.mem_get_info = _mem_get_info
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    for mod in (cuda, cuda.random):
        mod.get_rng_state = _cpu_rng_state
        mod.set_rng_state = _set_cpu_rng_state
    _patch_megatron_rng()
    warm_up_vml()
    block_quant_cpu.install()  # NVFP4 / MX fake quantization without CUDA kernels
    _mode = CudaToCpuMode()
    _mode.__enter__()  # stays pushed for the life of the process
    _applied = True
    return True


def _patch_megatron_rng() -> None:
    """megatron-core keeps its own reference to the CUDA RNG setter."""
    try:
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:  # megatron-core is a hard dependency, but keep import errors readable
        return
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )


def warm_up_vml() -> None:
    """Call each VML-backed unary op of torch once with few elements (one thread: below
    torch's 2048-element grain), so any lazy set-up inside MKL happens before threads call
    it together. A fresh process whose threaded torch.cos got EP accuracy on one thread was
    seen under load (tests/test_atomic_save.py, cross-process logits); the cause inside MKL
    is not known, this and kernels.one_thread are the mitigations."""
    x = torch.full((16,), 0.5)
    for op in (torch.cos, torch.sin, torch.tan, torch.acos, torch.asin, torch.atan, torch.exp,
               torch.log, torch.log2, torch.log10, torch.sqrt, torch.tanh, torch.erf, torch.erfc,
               torch.erfinv, torch.trunc):
        op(x)
        op(x.double())


def is_applied() -> bool:
    return _applied


@contextlib.contextmanager
def device_mode_suspended() -> Iterator[None]:
    """Pop the device-rewriting mode for a hot loop whose CUDA-assuming set-up already ran
    (generate's decode steps after the prefill allocated the KV cache). The per-op Python
    dispatch of the mode costs ~15% of a CPU decode step on SmolLM2."""
    if _mode is None:
        yield
        return
    _mode.__exit__(None, None, None)
    try:
        yield
    finally:
        _mode.__enter__()


def _cuda_type_name(t: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any):
    """``Tensor.type`` under the device mode: CPU tensors stand for CUDA tensors, so they
    report the CUDA type name megatron-core compares against, and a CUDA type name as a
    conversion target means the CPU type. Any other call is torch's own."""
    if dtype is None and not kwargs:
        name = torch.Tensor.type(t)
        if t.device.type == "cpu" and not name.startswith("torch.cuda."):
            return name.replace("torch.", "torch.cuda.", 1)
        return name
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = "torch." + dtype[len("torch.cuda."):]
    return torch.Tensor.type(t, dtype, non_blocking, **kwargs)
