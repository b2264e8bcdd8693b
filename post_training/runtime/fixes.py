"""Fixes of upstream bugs, version shims and registrations with upstream registries.

Each is a patch registry entry (:mod:`.patches`) applied by ``init_runtime`` on every device
(``when = ALWAYS``): they correct what megatron-core 0.16.1 / ModelOpt 0.47 do wrong for every
model the toolkit builds, CPU or GPU. Until then nothing here has been applied; in particular,
importing :mod:`post_training.quant_modules` or :mod:`post_training.export` changes nothing.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from post_training.runtime.patches import ALWAYS, ON_DEMAND, AttrSwap, Patch, swaps


def _glu_quantizer_sharded_state_dict(orig: Any):
    """ModelOpt's ``_MegatronMLP.sharded_state_dict``, with its key patterns searched, not
    matched (see the ``modelopt_glu_quantizer_sharding`` entry)."""
    from megatron.core.transformer import mlp as megatron_mlp
    from modelopt.torch.opt.plugins.megatron import _MegatronMLP

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

    return sharded_state_dict


def _output_layer_sharded_state_dict(upstream: Any):
    """``GPTModel.sharded_state_dict`` keeping ``output_layer._extra_state`` when it carries
    data (see the ``gpt_output_layer_extra_state`` entry)."""
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

    return sharded_state_dict


def _medusa_head_sharded_state_dict(orig: Any):
    """ModelOpt's ``MedusaHead.sharded_state_dict`` with the metadata megatron's layers need
    (see the ``modelopt_medusa_sharding_metadata`` entry)."""
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

        return orig(self, prefix, sharded_offsets, ensure_metadata_has_dp_cp_group(metadata))

    return sharded_state_dict


MEDUSA_FIX = "modelopt_medusa_sharding_metadata"


def apply_medusa_fix() -> None:
    """Apply :data:`MEDUSA_FIX` (a Medusa head is built or loaded)."""
    from post_training.runtime import patches

    patches.apply(MEDUSA_FIX)


def _register_sdpa_quant_module() -> None:
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    from post_training.attention import SDPAttention
    from post_training.quant_modules import QuantSDPAttention

    QuantModuleRegistry.register({SDPAttention: "post_training_SDPAttention"})(QuantSDPAttention)


def _unregister_sdpa_quant_module() -> None:
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    from post_training.attention import SDPAttention

    QuantModuleRegistry.unregister(SDPAttention)


_UEM = "modelopt.torch.export.unified_export_megatron"
_EXPORTER_ADDED: list[str] = []  # names the shim defined in ModelOpt's exporter module


def _complete_exporter_imports() -> None:
    import importlib

    uem = importlib.import_module(_UEM)
    if uem.has_mcore:  # a ModelOpt/megatron pair that imports cleanly: nothing to complete
        return
    from megatron.core import parallel_state as ps
    from megatron.core.models.mamba.mamba_model import MambaModel
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.ssm.mamba_layer import MambaLayer
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import L2Norm
    from megatron.core.transformer.transformer_layer import TransformerLayer

    names = dict(HybridModel=MambaModel, LLaVAModel=LLaVAModel, MambaLayer=MambaLayer,
                 IdentityOp=IdentityOp, L2Norm=L2Norm, TransformerLayer=TransformerLayer)
    for fn in ("get_data_parallel_rank", "get_expert_model_parallel_group",
               "get_expert_model_parallel_rank", "get_expert_model_parallel_world_size",
               "get_pipeline_model_parallel_rank", "get_pipeline_model_parallel_world_size",
               "get_tensor_model_parallel_rank"):
        names[fn] = getattr(ps, fn)
    for name, value in names.items():
        if not hasattr(uem, name):
            setattr(uem, name, value)
            _EXPORTER_ADDED.append(name)
    uem.has_mcore = True
    _EXPORTER_ADDED.append("has_mcore")


def _undo_exporter_imports() -> None:
    import importlib

    uem = importlib.import_module(_UEM)
    for name in _EXPORTER_ADDED:
        if name == "has_mcore":
            uem.has_mcore = False
        else:
            delattr(uem, name)
    _EXPORTER_ADDED.clear()


_MLP_SDS = "modelopt.torch.opt.plugins.megatron:_MegatronMLP.sharded_state_dict"
_GPT_SDS = "megatron.core.models.gpt.gpt_model:GPTModel.sharded_state_dict"
_SWIGLU = {"megatron.core.transformer.mlp:apply_swiglu_sharded_factory":
           "(original_sh_ten, sharded_offsets, singleton_local_shards: bool = False)"}

PATCHES = [
    Patch(
        "modelopt_glu_quantizer_sharding", {_MLP_SDS: "(self, prefix='', sharded_offsets=(), metadata=None)"},
        "applies megatron's SwiGLU sharded factory to linear_fc1's per-channel quantizer state, as "
        "ModelOpt's _MegatronMLP.sharded_state_dict means to: it tests its key patterns "
        "(weight_quantizer\\.(\\d+\\.)*_amax$) with re.match against full prefixed keys "
        "(decoder.layers.0.mlp.linear_fc1...), which never match. The amax is then saved TP-chunked "
        "as [gate_0, up_0, gate_1, up_1] while the weight is saved as [gate, up]: loaded at another "
        "TP, channel scales land on the wrong rows (INT8 per-channel, TP=2 -> TP=1: logits off by "
        "0.36). Same logic with re.search; per-tensor state stays replicated",
        ALWAYS, *swaps(AttrSwap(_MLP_SDS, _glu_quantizer_sharded_state_dict)),
        covers="every dist-checkpoint save/load of a quantized gated MLP", depends=_SWIGLU,
        group="fixes"),
    Patch(
        "gpt_output_layer_extra_state",
        {_GPT_SDS: "(self, prefix: str = '', sharded_offsets: tuple = (), metadata: Optional[Dict] = "
                   "None) -> Dict[str, Any]"},
        "GPTModel.sharded_state_dict (megatron-core 0.16.1) drops output_layer._extra_state and "
        "asserts it is empty; ModelOpt 0.47 patches only an older version of that method (it warns "
        "'not the version ModelOpt patches'), so the output layer's quantizer state was never saved. "
        "For auto_quantize checkpoints that is wrong, not just lossy: restoring its mode enables "
        "8-bit quantizers everywhere and relies on each module's saved state to set them back, so "
        "the output layer came back quantized. The upstream method runs with that state hidden and "
        "the entry is kept whenever it carries data, as ModelOpt's own patch does for older versions",
        ALWAYS, *swaps(AttrSwap(_GPT_SDS, _output_layer_sharded_state_dict)),
        covers="every dist-checkpoint save/load of a GPTModel with ModelOpt state", group="fixes"),
    Patch(
        "sdpa_kv_quant_module",
        {"modelopt.torch.quantization.nn:QuantModuleRegistry.register":
             "(cls_to_key: dict[type[torch.nn.modules.module.Module], str]) -> "
             "collections.abc.Callable[[type[~T]], type[~T]]",
         "modelopt.torch.quantization.nn:QuantModuleRegistry.unregister":
             "(nn_cls: type[torch.nn.modules.module.Module] | type[~T]) -> None"},
        "registers post_training.quant_modules.QuantSDPAttention for our SDPAttention core "
        "attention in ModelOpt's QuantModuleRegistry: ModelOpt registers KV-cache (BMM) "
        "quantization only for Transformer Engine's TEDotProductAttention, so without it "
        "*[kv]_bmm_quantizer configs silently quantize nothing on the local layer spec",
        ALWAYS, _register_sdpa_quant_module, _unregister_sdpa_quant_module,
        covers="mtq.quantize / auto_quantize / restore of models built by model_builder",
        group="fixes"),
    Patch(
        "modelopt_exporter_imports", {f"{_UEM}:has_mcore": None},
        "version shim: ModelOpt 0.47 imports megatron.core.models.hybrid.hybrid_model.HybridModel "
        "(megatron-core >= 0.17; 0.16 calls it mamba.mamba_model.MambaModel) inside one "
        "import_plugin('megatron') block of unified_export_megatron.py; the ImportError is "
        "swallowed and every name after it in that block stays undefined, so the exporter dies "
        "with NameError: HybridModel. Defines the names that block would have defined (only those "
        "missing) and sets has_mcore; a no-op where the block imported",
        ALWAYS, _complete_exporter_imports, _undo_exporter_imports,
        covers="modelopt.torch.export.export_mcore_gpt_to_hf (post_training.export)",
        depends={"megatron.core.models.mamba.mamba_model:MambaModel": None,
                 f"{_UEM}:GPTModelExporter.__init__":
                     "(self, model: torch.nn.modules.module.Module, pretrained_model_name_or_path: "
                     "str | os.PathLike | None = None, export_extra_modules: bool = False, "
                     "dtype=torch.bfloat16, trust_remote_code: bool = False, moe_router_dtype: "
                     "str | None = None, clamp_kv_cache_scales: bool = True)"},
        group="fixes"),
    Patch(
        "lora_glu_sharding",
        {"modelopt.torch.peft.lora.plugins.megatron:_LoRAMegatronColumnParallelLinear."
         "sharded_state_dict": "(self, prefix='', sharded_offsets=(), metadata=None)"},
        "ModelOpt 0.47's column-parallel LoRA shards lora_b plainly on dim 0, i.e. globally as "
        "[gate_0; up_0; gate_1; up_1] for a gated linear_fc1 at TP=2, while megatron saves the "
        "weight in the SwiGLU layout [gate; up]: reloaded at another TP, gate and up rows of the "
        "update swap (TP=2 -> TP=1: logits off by 2.3). Kept as a transform of our own state dict "
        "at the call site, not a patch of the plugin: the LoRA module cannot tell a gated "
        "linear_fc1 from linear_qkv (same class, no module path), the model-level dict can; and "
        "no upstream function changes for other code in the process. Every save and load of the "
        "toolkit goes through that call site, so the layout on disk is always the SwiGLU one",
        "call site: post_training.checkpointing.load.model_sharded_state_dict (every save and load)",
        None, depends=_SWIGLU, group="fixes"),
    Patch(
        "kd_student_lm_loss",
        {"modelopt.torch.distill.plugins.megatron:adjust_distillation_model_for_mcore":
             "(model: modelopt.torch.distill.distillation_model.DistillationModel, distill_cfg: "
             "modelopt.torch.distill.plugins.megatron.DistillationConfig)"},
        "the plugin sets the student's compute_language_model_loss (an instance method) to zeros "
        "under skip_lm_loss and to megatron's vocab-parallel cross entropy otherwise; that cross "
        "entropy works in place on fp32 logits (its .float() is then no copy), so the logits the KD "
        "hook captured on output_layer become softmax probabilities before the KL reads them "
        "(fp32 CPU runs: the KD loss stalled at a constant). The student's method is set again "
        "after the plugin's: fp32 logits are cloned for the cross entropy, and under skip_lm_loss "
        "the real LM loss is returned detached, so it is reported without gradient",
        "call site: post_training.distillation.setup_distillation (_student_lm_loss)",
        None,
        depends={"megatron.core.models.common.language_module.language_module:LanguageModule."
                 "compute_language_model_loss": "(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor",
                 "megatron.core.tensor_parallel.cross_entropy:VocabParallelCrossEntropy.calculate_logits_max":
                     "(vocab_parallel_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]"},
        group="fixes"),
    Patch(
        MEDUSA_FIX,
        {"modelopt.torch.speculative.plugins.megatron_medusa:MedusaHead.sharded_state_dict":
             "(self, prefix: str = '', sharded_offsets: tuple = (), metadata: dict | None = None) -> "
             "Dict[str, Any]"},
        "ModelOpt 0.47's Medusa model passes its caller's sharded-state-dict metadata unchanged to "
        "each MedusaHead, whose lm_head (megatron-core 0.16.1 ColumnParallelLinear) reads "
        "metadata['dp_cp_group']; megatron's own modules fill that entry when the metadata is None "
        "(ensure_metadata_has_dp_cp_group), the Medusa heads do not, and ModelOpt's "
        "restore_sharded_modelopt_state calls sharded_state_dict() without metadata: every save "
        "and load of a Medusa checkpoint failed with TypeError. The head fills the entry the same way",
        ON_DEMAND, *swaps(AttrSwap("modelopt.torch.speculative.plugins.megatron_medusa:MedusaHead."
                                   "sharded_state_dict", _medusa_head_sharded_state_dict)),
        covers="post_training.speculative.heads.convert_model and post_training.checkpointing.load."
               "load_model_checkpoint (a Medusa checkpoint)",
        depends={"megatron.core.transformer.utils:ensure_metadata_has_dp_cp_group": "(metadata: Optional[dict]) -> dict"},
        group="fixes"),
]
