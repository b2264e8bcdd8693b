"""Build a megatron-core ``GPTModel`` from a Hugging Face config and import its weights.

Layer spec: megatron-core's local (pure PyTorch) modules with our SDPA core attention, so
the same model runs on CPU and GPU; with ``--transformer-impl transformer_engine`` (GPU and
TE installed) ModelOpt's TE-backed spec is used instead. ModelOpt transformations
(quantization, distillation, speculative heads) apply on top of the built model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from post_training import hf as hf_mod
from post_training.attention import SDPAttention
from post_training.config import EMBEDDED_MODEL, ModelConfig, SourceConfig
from post_training.runtime import Runtime
from post_training.runtime.dist import have_te
from post_training.utils import UsageError, print_rank_0

SUPPORTED_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


_hf_get = hf_mod.hf_get


def rope_settings(hf: Any) -> dict:
    params = _hf_get(hf, "rope_parameters") or _hf_get(hf, "rope_scaling") or {}
    theta = params.get("rope_theta", _hf_get(hf, "rope_theta", 10000.0))
    out = {"rotary_base": int(theta), "rope_scaling": False}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "llama3":
        out.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif kind not in ("default", None):
        raise UsageError(f"rope scaling type {kind!r} is not supported yet")
    return out


def transformer_config_from_hf(hf: Any, rt: Runtime, mcfg: ModelConfig) -> TransformerConfig:
    arch = (_hf_get(hf, "architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHS:
        raise UsageError(f"architecture {arch} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    if _hf_get(hf, "hidden_act", "silu") != "silu":
        raise UsageError(f"activation {hf.hidden_act!r} is not supported (expected silu)")
    hf_mod.check_parallel(hf, rt.tp, rt.pp)
    dtype = mcfg.torch_dtype
    heads = hf.num_attention_heads
    head_dim = _hf_get(hf, "head_dim", hf.hidden_size // heads)
    on_cpu = rt.is_cpu
    return TransformerConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=_hf_get(hf, "num_key_value_heads", heads),
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=_hf_get(hf, "rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch == "Qwen2ForCausalLM" or bool(_hf_get(hf, "attention_bias", False)),
        qk_layernorm=arch == "Qwen3ForCausalLM",
        hidden_dropout=mcfg.hidden_dropout,
        attention_dropout=mcfg.attention_dropout,
        tensor_model_parallel_size=rt.tp,
        pipeline_model_parallel_size=rt.pp,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        # Fused kernels exist only on GPU.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def use_te_spec(mcfg: ModelConfig, rt: Runtime) -> bool:
    if mcfg.transformer_impl == "transformer_engine":
        if rt.is_cpu or not have_te():
            raise UsageError("--transformer-impl transformer_engine needs a GPU and transformer-engine installed")
        return True
    return mcfg.transformer_impl == "auto" and not rt.is_cpu and have_te()


def layer_spec(config: TransformerConfig, use_te: bool) -> ModuleSpec:
    if use_te:
        from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

        return get_gpt_modelopt_spec(config, remap_te_layernorm=True)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(hf: Any, rt: Runtime, mcfg: ModelConfig) -> GPTModel:
    """The GPTModel stage owned by this rank (pre/post process by pipeline position).
    SDPAttention's KV-cache QuantModule is registered with ModelOpt by the runtime
    (``sdpa_kv_quant_module`` in :mod:`post_training.runtime.fixes`)."""
    config = transformer_config_from_hf(hf, rt, mcfg)
    te = use_te_spec(mcfg, rt)
    print_rank_0(f"layer spec: {'transformer_engine (ModelOpt)' if te else 'local + SDPA attention'}")
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, te),
        vocab_size=hf.vocab_size,
        max_sequence_length=max(mcfg.seq_length, _hf_get(hf, "max_position_embeddings", 0)),
        pre_process=rt.is_first_stage,
        post_process=rt.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(_hf_get(hf, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        **rope_settings(hf),
    )
    model.to(device=rt.device, dtype=mcfg.torch_dtype)
    return model


def import_hf_weights(model: GPTModel, hf_dir: str, dtype: torch.dtype) -> None:
    """HF safetensors -> this rank's shard of the model, via ModelOpt's importer."""
    from modelopt.torch.export import import_mcore_gpt_from_hf

    import_mcore_gpt_from_hf(model, str(hf_dir), dtype=dtype)


def setup_model(src: SourceConfig, mcfg: ModelConfig, rt: Runtime, inference: bool = True,
                hf_dir: Path | None = None) -> tuple[GPTModel, Any, Any]:
    """Build this rank's model stage and fill it from ``--load`` (dist checkpoint or HF dir) or
    the HF model. Returns (model, tokenizer, hf_config); ``hf_config.name_or_path`` is the HF
    directory the config and tokenizer came from (what export and saves copy); ``hf_dir`` is
    that directory when the caller resolved it already (:func:`hf.source_hf_dir`).

    ``inference`` freezes the weights: megatron's linear layers then take their frozen-weight
    path, which skips gradient bookkeeping (about 6% of a CPU decode step on SmolLM2)."""
    from transformers import AutoConfig

    from post_training.checkpointing.load import load_model_checkpoint

    hf_dir = hf_dir or hf_mod.source_hf_dir(src)  # callers that loaded the tokenizer first pass it
    hf_config = AutoConfig.from_pretrained(hf_dir)
    # The default conf with another HF dir means "use that model"; a named conf must match it.
    explicit = src.pretrained_model_path or src.load
    if not (explicit and src.model_conf == EMBEDDED_MODEL):
        hf_mod.check_expected(hf_mod.load_conf(src.model_conf), hf_config)
    model = build_model(hf_config, rt, mcfg)
    if src.load and hf_mod.load_kind(src.load) == "dist":
        load_model_checkpoint(src.load, model, rt, strictness=src.strictness, verify_hashes=src.verify_hashes)
    else:
        import_hf_weights(model, hf_dir, mcfg.torch_dtype)
    model.eval()
    if inference:
        model.requires_grad_(False)
        if src.load and hf_mod.load_kind(src.load) == "dist":
            from post_training.speculative.heads import draft_kind

            if draft_kind(model) is not None:  # a checkpoint with a trained draft head (eagle3.sh)
                from post_training.speculative.head_drafter import use_plain_forward

                use_plain_forward(model)
    return model, hf_mod.load_tokenizer(hf_dir), hf_config
