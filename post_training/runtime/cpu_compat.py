"""CPU compatibility layer for megatron-core and ModelOpt.

Both libraries assume CUDA in a number of places. Rather than patching each call
site, we (1) give the few ``torch.cuda`` query functions they call a CPU answer and
(2) push a :class:`torch.overrides.TorchFunctionMode` that rewrites any CUDA device
argument (``device="cuda"``, ``device=0``, ``.cuda()``, ``.to("cuda")``) to CPU.

Each shim is an entry of the patch registry (:mod:`post_training.runtime.patches`), listed in
:data:`PATCHES` with the upstream sites it replaces and the call sites it covers. ``init_runtime``
applies them only when CUDA is absent (``PT_NO_CPU_COMPAT=1`` disables them); importing this
module changes nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from post_training.runtime import block_quant_cpu
from post_training.runtime.patches import CPU, AttrSwap, Patch, swaps

_CPU = torch.device("cpu")
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


def _push_mode() -> None:
    global _mode
    _mode = CudaToCpuMode()
    _mode.__enter__()  # stays pushed for the life of the process (or until removed)


def _pop_mode() -> None:
    global _mode
    if _mode is not None:
        _mode.__exit__(None, None, None)
    _mode = None


def is_applied() -> bool:
    """Whether the device-rewriting mode (the shim everything CUDA-assuming needs) is active."""
    return _mode is not None


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


def _cpu_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
    torch.set_rng_state(state)


def _mem_get_info(device: Any = None) -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


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


def _const(value: Any) -> Callable[[Any], Any]:
    return lambda orig: value


_RNG = "megatron.core.tensor_parallel.random"
_TRNG = "torch.cuda.random"
_SIG_GET_RNG = "(device: int | str | torch.device = 'cuda') -> torch.Tensor"
_SIG_SET_RNG = "(new_state: torch.Tensor, device: int | str | torch.device = 'cuda') -> None"


def _entry(name: str, sites: dict, reason: str, covers: str, apply: Callable, remove: Callable | None
           ) -> Patch:
    return Patch(name, sites, reason, CPU, apply, remove, covers=covers, group="cpu_compat")


PATCHES: list[Patch] = [
    _entry("cuda_current_device", {"torch.cuda:current_device": "() -> int"},
           "returns torch.device('cpu'): a valid device argument even while the device mode is "
           "suspended; upstream asks CUDA for its current device index",
           "megatron-core rotary_pos_embedding.get_emb/RotaryEmbedding.__init__, "
           "utils.GlobalMemoryBuffer.get_tensor, dist_checkpointing save_state_dict_async_finalize, "
           "~175 other current_device() calls",
           *swaps(AttrSwap("torch.cuda:current_device", _const(lambda: _CPU)))),
    _entry("cuda_synchronize",
           {"torch.cuda:synchronize": "(device: torch.device | str | int | None = None) -> None"},
           "no-op: there is no CUDA stream to wait for",
           "modelopt.torch.opt.plugins.megatron _modelopt_get_extra_state; timers",
           *swaps(AttrSwap("torch.cuda:synchronize", _const(lambda device=None: None)))),
    _entry("cuda_mem_get_info", {"torch.cuda:mem_get_info": "(device: 'Device' = None) -> tuple[int, int]"},
           "returns (available RAM, total RAM) instead of failing without a GPU",
           "modelopt.torch.utils.plugins.megatron_generate; memory reports",
           *swaps(AttrSwap("torch.cuda:mem_get_info", _const(_mem_get_info)))),
    _entry("cuda_rng",
           {"torch.cuda:manual_seed": "(seed: int) -> None",
            "torch.cuda:manual_seed_all": "(seed: int) -> None",
            "torch.cuda:get_rng_state": _SIG_GET_RNG, "torch.cuda:set_rng_state": _SIG_SET_RNG,
            f"{_TRNG}:get_rng_state": _SIG_GET_RNG, f"{_TRNG}:set_rng_state": _SIG_SET_RNG},
           "the CUDA generator's seed/state functions act on the CPU generator (the one CPU "
           "kernels draw from); manual_seed_all is a no-op because torch.manual_seed itself calls "
           "it after seeding the CPU generator",
           "megatron-core tensor_parallel.random.model_parallel_cuda_manual_seed, "
           "CudaRNGStatesTracker.fork, checkpoint RNG state",
           *swaps(AttrSwap("torch.cuda:manual_seed",
                           _const(lambda seed: torch.default_generator.manual_seed(int(seed)))),
                  AttrSwap("torch.cuda:manual_seed_all", _const(lambda seed: None)),
                  *(AttrSwap(f"{mod}:{fn}", _const(impl)) for mod in ("torch.cuda", _TRNG)
                    for fn, impl in (("get_rng_state", _cpu_rng_state),
                                     ("set_rng_state", _set_cpu_rng_state))))),
    _entry("megatron_cuda_rng",
           {f"{_RNG}:_get_cuda_rng_state": "(device: Union[int, str, torch.device] = 'cuda', "
                                           "clone: bool = False, graph_safe: bool = False) -> torch.Tensor",
            f"{_RNG}:_set_cuda_rng_state": "(new_state: torch.Tensor, device: int = -1, "
                                           "graph_safe: bool = False)"},
           "megatron-core keeps its own references to the CUDA RNG getter/setter (CUDA generator "
           "objects); they read and set the CPU generator's state instead",
           "megatron-core CudaRNGStatesTracker.add/fork/get_states/set_states",
           *swaps(AttrSwap(f"{_RNG}:_get_cuda_rng_state", _const(
                      lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())),
                  AttrSwap(f"{_RNG}:_set_cuda_rng_state", _const(
                      lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))))),
    _entry("block_quant_cpu",
           {"modelopt.torch.quantization.tensor_quant:dynamic_block_quantize_op": None,
            "modelopt.torch.quantization.tensor_quant:_dynamic_block_quantize_impl":
                "(inputs: torch.Tensor, block_size: int, amax: torch.Tensor, num_bits: int, "
                "exponent_bits: int, scale_num_bits: int, scale_exponent_bits: int)"},
           "ModelOpt dynamic block quantization (NVFP4, MXFP8/MXFP6/MXFP4/MXINT8) has only CUDA/"
           "Triton kernels ('amax must be a CUDA tensor for dynamic block quantization' for NVFP4; "
           "get_cuda_ext_mx().fused_amax_convert for MX): runtime/block_quant_cpu.py registers a "
           "plain-torch emulation with the same rounding as the op's CPU kernel",
           "TensorQuantizer._fake_quantize via DynamicBlockQuantizationFunction",
           block_quant_cpu.install, block_quant_cpu.uninstall),
    _entry("vml_warm_up", {"torch:cos": None},
           "MKL VML warm-up: torch's VML-backed float functions (cos, sin, exp, ...) run once on "
           "one thread at start-up, before any multi-threaded call: in 3 of ~90 fresh processes "
           "under CPU load the first 2-thread vmsCos returned enhanced-performance (EP, ~1.5e-4) "
           "instead of the requested high-accuracy results on the main thread's half of the table",
           "torch.cos of megatron's rotary table", warm_up_vml, None),
    _entry("cuda_device_mode",
           {"torch.overrides:TorchFunctionMode.__torch_function__": "(self, func, types, args=(), kwargs=None)",
            "torch:Tensor.type": None, "torch:Tensor.cuda": None, "torch:Tensor.to": None},
           "a TorchFunctionMode pushed for the process rewrites device='cuda'|int|"
           "torch.device('cuda') arguments to CPU, makes Tensor.cuda() return self and "
           "Tensor.to('cuda') go to CPU; Tensor.type() names a CPU tensor by its CUDA type "
           "('torch.cuda.FloatTensor') and Tensor.type('torch.cuda.X') converts to 'torch.X'. "
           "Patching each of the many CUDA-assuming sites one by one does not scale",
           "megatron-core schedules.forward_backward_no_pipelining (torch.zeros(device='cuda')), "
           "optimizer.FP32Optimizer (torch.tensor(..., device='cuda')), "
           "transformer.dot_product_attention buffers, tensor_parallel mappings, .cuda() calls; "
           "optimizer.clip_grads.clip_grad_by_total_norm_fp32 "
           "(assert param.grad.type() == 'torch.cuda.FloatTensor'), "
           "optimizer.Float16OptimizerWithFloat16Params and distrib_optimizer "
           "(param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor'])",
           _push_mode, _pop_mode),
]
SHIMS = PATCHES  # the CPU shims, as listed by `python -m post_training.runtime`
