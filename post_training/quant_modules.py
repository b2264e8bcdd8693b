"""ModelOpt quantization support for our own megatron-core modules.

ModelOpt's megatron plugin registers KV-cache (BMM) quantization only for Transformer Engine's
``TEDotProductAttention`` (``_QuantTEDotProductAttention`` in
``modelopt/torch/quantization/plugins/megatron.py``, defined only when TE imports). Our local
layer spec uses ``SDPAttention`` instead, so without this module ``*[kv]_bmm_quantizer``
configs would silently quantize nothing. :class:`QuantSDPAttention` gives ``SDPAttention`` the
same behaviour: q/k/v ``TensorQuantizer``s applied to post-RoPE query/key/value, scalar
quantizer state in the megatron sharded state dict, and the per-module quantizer state in
``_extra_state`` (callbacks installed by ModelOpt's ``megatron_replace_quant_module_hook``).

Importing this module registers nothing: the ``sdpa_kv_quant_module`` entry of the patch registry
(:mod:`post_training.runtime.fixes`, applied by ``init_runtime``) puts it in ModelOpt's
``QuantModuleRegistry``, next to the fixes of ModelOpt's megatron sharding this module used to
apply at import.
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core import parallel_state as mcore_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

# Importing the plugin registers ModelOpt's megatron hook (extra-state callbacks, attention
# configuration for KV-cache quantization) that also serves QuantSDPAttention. That is
# ModelOpt's own import-time registration, not a change of ours.
import modelopt.torch.quantization.plugins.megatron  # noqa: F401
from modelopt.torch.quantization.nn import QuantModule, TensorQuantizer
from modelopt.torch.utils.distributed import ParallelState

__all__ = ["QuantSDPAttention"]


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
