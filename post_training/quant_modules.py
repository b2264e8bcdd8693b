"""ModelOpt quantization support for our own megatron-core modules.

ModelOpt's megatron plugin registers KV-cache (BMM) quantization only for Transformer Engine's
``TEDotProductAttention`` (``_QuantTEDotProductAttention`` in
``modelopt/torch/quantization/plugins/megatron.py``, defined only when TE imports). Our local
layer spec uses ``SDPAttention`` instead, so without this module ``*[kv]_bmm_quantizer``
configs would silently quantize nothing. Importing this module registers ``SDPAttention`` with
the same behaviour: q/k/v ``TensorQuantizer``s applied to post-RoPE query/key/value, scalar
quantizer state in the megatron sharded state dict, and the per-module quantizer state in
``_extra_state`` (callbacks installed by ModelOpt's ``megatron_replace_quant_module_hook``).
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as mcore_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

# Importing the plugin registers ModelOpt's megatron hook (extra-state callbacks, attention
# configuration for KV-cache quantization) that also serves the class registered below.
import modelopt.torch.quantization.plugins.megatron  # noqa: F401
from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
from modelopt.torch.utils.distributed import ParallelState

from post_training.attention import SDPAttention

__all__ = ["QuantSDPAttention"]


@QuantModuleRegistry.register({SDPAttention: "post_training_SDPAttention"})
class QuantSDPAttention(QuantModule):
    """``SDPAttention`` with KV-cache quantization, mirroring ``_QuantTEDotProductAttention``.

    The quantizers act on query/key/value as core attention receives them (after RoPE and, at
    decode time, the whole cached K/V), which is what an FP8/INT8 KV cache stores.
    """

    q_bmm_quantizer: TensorQuantizer
    k_bmm_quantizer: TensorQuantizer
    v_bmm_quantizer: TensorQuantizer

    def _setup(self) -> None:
        self.q_bmm_quantizer = TensorQuantizer()
        self.k_bmm_quantizer = TensorQuantizer()
        self.v_bmm_quantizer = TensorQuantizer()
        # ModelOpt's max calibration syncs the k/v amax over this TP group (heads are split
        # over TP ranks, the KV-cache scale must not be).
        try:
            dp_group = mcore_parallel.get_data_parallel_group(with_context_parallel=True)
        except AssertionError:
            dp_group = mcore_parallel.get_data_parallel_group()
        self.parallel_state = ParallelState(dp_group, mcore_parallel.get_tensor_model_parallel_group())

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        query = self.q_bmm_quantizer(query)
        key = self.k_bmm_quantizer(key)
        value = self.v_bmm_quantizer(value)
        return super().forward(query, key, value, *args, **kwargs)

    def modelopt_post_restore(self, prefix: str = "") -> None:
        """Only per-tensor (scalar) BMM state is resharding-safe, as in ModelOpt's TE version.

        The device/dtype come from the parent attention (set by ModelOpt's hook): this module
        has no weights of its own to take them from."""
        for tq in (self.q_bmm_quantizer, self.k_bmm_quantizer, self.v_bmm_quantizer):
            if not all(v.numel() == 1 for v in tq.state_dict().values()):
                raise NotImplementedError("only scalar states are supported for KV-cache/BMM quantizers")
        assert hasattr(self, "device") and hasattr(self, "dtype"), "set by megatron_replace_quant_module_hook"
        self.to(device=self.device, dtype=self.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> ShardedStateDict:
        """Replicated scalar ``*_amax`` tensors plus ``_extra_state`` as a ShardedObject.

        The layout ModelOpt's TE version writes: the BMM state is per-tensor, so nothing is
        split over TP. (MegatronModule's default gives the same today; this pins it.)"""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {}, sharded_offsets)

    # torch puts ``_extra_state`` into state_dict (and calls set_extra_state on load) only when
    # the *class* overrides these; TE modules do, SDPAttention does not. ModelOpt's hook then
    # installs per-instance versions that serialize the quantizer state. Same as megatron's
    # ColumnParallelLinear ("keep compatibility with TE state dict").
    def get_extra_state(self) -> Any:
        return None

    def set_extra_state(self, state: Any) -> None:
        return None


def _glu_quantizer_sharding_fix() -> None:
    """Apply megatron's SwiGLU sharded factory to ``linear_fc1``'s per-channel quantizer state.

    ModelOpt's ``_MegatronMLP.sharded_state_dict`` (modelopt/torch/opt/plugins/megatron.py)
    means to do this, but tests its key patterns (``weight_quantizer\\.(\\d+\\.)*_amax$``) with
    ``re.match`` against full prefixed keys (``decoder.layers.0.mlp.linear_fc1...``), which
    never match. The amax is then saved TP-chunked as [gate_0, up_0, gate_1, up_1] while the
    weight is saved as [gate, up]: loaded at another TP, channel scales land on the wrong rows
    (INT8 per-channel, TP=2 -> TP=1: logits off by 0.36). Same logic, ``re.search``."""
    import re

    from megatron.core.transformer import mlp as megatron_mlp
    from modelopt.torch.opt.plugins.megatron import _MegatronMLP

    if getattr(_MegatronMLP, "_post_training_fixed", False):
        return
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = dict(metadata or {})
        metadata["singleton_local_shards"] = True
        sd = super(_MegatronMLP, self).sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.config.gated_linear_unit:
            return sd
        patterns = [re.compile(p) for p in self._modelopt_state_keys]
        for k, v in sd.items():
            # Only per-channel state has the gate/up row layout; per-tensor (scalar) state is
            # replicated and must stay as it is.
            per_channel = getattr(v, "data", None) is not None and v.data.dim() > 0 and v.data.numel() > 1
            if "linear_fc1" in k and per_channel and any(p.search(k) for p in patterns):
                sd[k] = megatron_mlp.apply_swiglu_sharded_factory(
                    v, sharded_offsets, metadata["singleton_local_shards"])
        return sd

    _MegatronMLP.sharded_state_dict = sharded_state_dict
    _MegatronMLP._post_training_fixed = True


_glu_quantizer_sharding_fix()


def _output_layer_extra_state_fix() -> None:
    """``GPTModel.sharded_state_dict`` (megatron-core 0.16.1) drops ``output_layer._extra_state``
    and asserts it is empty. ModelOpt 0.47 patches only an older version of that method (it warns
    "not the version ModelOpt patches"), so the output layer's quantizer state was never saved.
    For ``auto_quantize`` checkpoints that is wrong, not just lossy: restoring its mode enables
    8-bit quantizers everywhere and relies on each module's saved state to set them back, so the
    output layer came back quantized (and loading asserted: "Boolean value of Tensor ... is
    ambiguous"). Here the upstream method runs with that state hidden and the entry is kept
    whenever it carries data, which is what ModelOpt's own patch does for older megatron-core."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    if getattr(GPTModel.sharded_state_dict, "_post_training_fixed", False):
        return
    upstream = GPTModel.sharded_state_dict

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = getattr(self, "output_layer", None)
        if out is None or "get_extra_state" not in vars(out):  # no ModelOpt per-instance hook
            return upstream(self, prefix, sharded_offsets, metadata)
        hook = out.get_extra_state
        out.get_extra_state = lambda: None
        try:
            sd = upstream(self, prefix, sharded_offsets, metadata)
        finally:
            out.get_extra_state = hook
        key = f"{prefix}output_layer._extra_state"
        extra = out.sharded_state_dict(prefix=f"{prefix}output_layer.", metadata=metadata).get(key)
        data = getattr(extra, "data", None)
        if data is not None and (not isinstance(data, torch.Tensor) or data.numel() > 0):
            sd[key] = extra
        return sd

    sharded_state_dict._post_training_fixed = True
    GPTModel.sharded_state_dict = sharded_state_dict


_output_layer_extra_state_fix()


def disable_unsaved_output_layer_quantizers(model, iter_dir) -> None:
    """After restoring ModelOpt state: an output layer whose quantizer state is absent from the
    checkpoint had nothing enabled when saved (ModelOpt writes none for a disabled output layer),
    but modes such as ``auto_quantize`` restore every quantizer enabled and rely on that saved
    state to switch them back off. Switch them off here, so the model matches what was saved."""
    from torch.distributed.checkpoint import FileSystemReader

    out = getattr(model, "output_layer", None)
    quantizers = [m for m in out.modules() if isinstance(m, TensorQuantizer)] if out is not None else []
    if not quantizers:
        return
    keys = FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    if not any(k.startswith("output_layer._extra_state") for k in keys):
        for q in quantizers:
            q.disable()
