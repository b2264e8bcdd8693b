"""A lean ``TransformerLayer.forward`` (and block loop) for static-KV-cache inference on CPU.

megatron's layer forward is general: per call it walks offload/recompute/cuda-graph/
flash-decode/fused-TP branches, context managers and NVTX hooks in ``TransformerLayer``,
``Attention`` and the parallel linears, around a dozen tensor ops. For a CPU decode step of a
small model that Python is a measurable share of the step (SmolLM2-135M: ~10%). This path
runs the same ops on the layer's own modules for the common dense GPT layer and returns
``NotImplemented`` (the original runs) for anything else:

    input_layernorm -> linear_qkv -> split -> [q/k layernorm] -> RoPE(q), RoPE(k)
    -> static KV cache write -> core_attention -> linear_proj -> + residual
    -> pre_mlp_layernorm -> MLP -> + residual

It runs only for a cache that declares rotated keys (:mod:`.kv_format`): RoPE of the keys is
applied once before caching, as the ``kv_cache_rotated_keys`` patch does on megatron's path;
with one shared table and identity q/k norms, q and k are rotated in one elementwise pass.
Linear layers of megatron's exact classes without hooks are called as ``F.linear`` (+ the
TP reduce for row-parallel); any other module (ModelOpt-quantized linears, a quantized core
attention, hooks for calibration) goes through its own ``__call__``. The logits equal those
of megatron's layer with the other fast paths, bit for bit (tests/test_runtime.py); both use
``kernels.linear``, whose 2..8-row fp32 product is fp32-close, not bitwise. The
fast-path registry entries that route megatron's forwards here are in :mod:`.fastpath`.
"""
from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import attention as attn_mod
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import WrappedTensor, make_viewless_tensor
from torch.nn.modules import module as nn_module

from post_training.runtime import kernels
from post_training.runtime.kv_format import keys_rotated


def _qualifies(layer) -> bool:
    cfg, att = layer.config, layer.self_attention
    cls = type(layer)
    return (
        all(getattr(cls, n) is getattr(TransformerLayer, n)
            for n in ("_forward_attention", "_forward_mlp", "_forward_post_mlp"))
        and isinstance(att, SelfAttention)
        and all(getattr(type(att), n) is getattr(SelfAttention, n)
                for n in ("forward", "get_query_key_value_tensors"))
        and not getattr(layer, "is_moe_layer", False)
        and not (layer.recompute_input_layernorm or layer.recompute_pre_mlp_layernorm
                 or layer.recompute_mlp)
        and not any(getattr(layer, n, False) for n in ("offload_attn_norm", "offload_mlp_norm"))
        and not any(getattr(att, n, False) for n in (
            "offload_qkv_linear", "offload_core_attention", "offload_attn_proj"))
        and not cfg.inference_fuse_tp_communication
        and not cfg.flash_decode and not cfg.no_rope_freq and not cfg.attention_output_gate
        and not cfg.multi_latent_attention
        and cfg.num_query_groups >= att.world_size
        and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)
        and isinstance(layer.cross_attention, IdentityOp)
        and isinstance(layer.cross_attn_bda, IdentityFuncOp)
        and layer.self_attn_bda is get_bias_dropout_add
        and layer.mlp_bda is get_bias_dropout_add
    )


def _no_hooks(mod) -> bool:
    return not (mod._forward_hooks or mod._forward_pre_hooks or nn_module._global_forward_hooks
                or nn_module._global_forward_pre_hooks)


def _plain(mod, cls) -> bool:
    return (type(mod) is cls and _no_hooks(mod) and not mod.sequence_parallel
            and mod.config._cpu_offloading_context is None)


def _identity_qk_norms(att) -> bool:
    return all(n is None or type(n) is IdentityOp for n in (att.q_layernorm, att.k_layernorm))


def _joint_rope(t, freqs, cfg):
    """``kernels.rope_bshd`` (the table's cos/sin cached per forward), or NotImplemented
    where megatron's own formula differs (interleaved, partial rotary, YaRN mscale, MLA)."""
    return kernels.rope_bshd(t, freqs, rotary_interleaved=cfg.rotary_interleaved,
                               multi_latent_attention=cfg.multi_latent_attention,
                               mscale=attn_mod._yarn_get_concentration_factor_from_config(cfg))


def _column(mod, x):
    """ColumnParallelLinear's inference forward: the input copy to the TP region is an
    identity, the linear and bias add as ``kernels.linear``."""
    if not _plain(mod, ColumnParallelLinear) or mod.gather_output or mod.explicit_expert_comm:
        return mod(x)
    if mod.skip_bias_add:
        return kernels.linear(x, mod.weight), mod.bias
    return kernels.linear(x, mod.weight, mod.bias), None


def _row(mod, x):
    """RowParallelLinear's inference forward: linear, TP all-reduce, bias."""
    if (not _plain(mod, RowParallelLinear) or not mod.input_is_parallel or mod.explicit_expert_comm
            or mod.tp_group is None):
        return mod(x)
    out = kernels.linear(x, mod.weight)
    if mod.tp_group.size() > 1:
        out = kernels.tp_all_reduce(out, mod.tp_group)
    if mod.skip_bias_add:
        return out, mod.bias
    return (out + mod.bias if mod.bias is not None else out), None


def _mlp(mlp, x):
    """``kernels.gated_mlp`` with the linears above; else the module."""
    out = NotImplemented
    if type(mlp) is MLP and _no_hooks(mlp):
        out = kernels.gated_mlp(mlp, x, _column, _row)
    return mlp(x) if out is NotImplemented else out


def layer_forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                  rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                  rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                  packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **kwargs):
    ctx = inference_context
    # Only a cache declared to hold rotated keys: this path stores keys after RoPE.
    if (ctx is None or not keys_rotated(ctx) or not ctx.is_static_batching() or self.training
            or context is not None or attention_bias is not None or packed_seq_params is not None
            or rotary_pos_cos is not None or rotary_pos_sin is not None
            or rotary_pos_cos_sin is not None or kwargs.get("inference_params") is not None):
        return NotImplemented
    # Checked once per layer and class (ModelOpt converts modules by swapping their class).
    cached = self.__dict__.get("_pt_fast_layer")
    if cached is None or cached[0] is not type(self):
        cached = self.__dict__["_pt_fast_layer"] = (type(self), _qualifies(self))
    if not cached[1]:
        return NotImplemented
    att, cfg = self.self_attention, self.config
    sq, b = hidden_states.shape[0], hidden_states.shape[1]
    start, b0 = ctx.sequence_len_offset, ctx.batch_size_offset
    end = start + sq
    # Decided before any module runs, so a fallback never calls a (hooked) module twice;
    # past the cache's capacity megatron's own assertion explains the error.
    if ((cfg.mlp_chunks_for_prefill > 1 and not ctx.is_decode_only())
            or end > ctx.max_sequence_length or b0 + b > ctx.max_batch_size):
        return NotImplemented

    residual = hidden_states
    qkv, _ = _column(att.linear_qkv, self.input_layernorm(hidden_states))  # megatron drops it too
    ng, hn = att.num_query_groups_per_partition, att.hidden_size_per_attention_head
    per_group = att.num_attention_heads_per_partition // ng
    qkv = qkv.view(sq, b, ng, (per_group + 2) * hn)
    query = key = None
    if (rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple)
            and _identity_qk_norms(att) and not cfg.apply_rope_fusion):
        # Self-attention shares one table for q and k, and each group's q heads and k head are
        # adjacent in qkv: rotate them in one elementwise pass (same ops, same values).
        qk = qkv[..., :(per_group + 1) * hn].reshape(sq, b, ng, per_group + 1, hn)
        qk = _joint_rope(qk, rotary_pos_emb[start:end].unsqueeze(2), cfg)
        if qk is not NotImplemented:
            query = qk[:, :, :, :per_group].reshape(sq, b, -1, hn)
            key = qk[:, :, :, per_group]
            value = qkv[..., (per_group + 1) * hn:]
    if query is None:
        query, key, value = torch.split(qkv, [per_group * hn, hn, hn], dim=3)
        query = query.reshape(sq, b, -1, hn)
        if att.q_layernorm is not None:
            query = att.q_layernorm(query)
        if att.k_layernorm is not None:
            key = att.k_layernorm(key)
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            key = kernels.rotate_rows(att, key, k_emb, start)
            query = kernels.rotate_rows(att, query, q_emb, start)

    memory = ctx.key_value_memory_dict.get(att.layer_number)
    if memory is None:
        memory = (
            att._allocate_memory(ctx.max_sequence_length, ctx.max_batch_size, att.key_hidden_size, key.dtype),
            att._allocate_memory(ctx.max_sequence_length, ctx.max_batch_size, att.val_hidden_size,
                                 value.dtype),
        )
        ctx.key_value_memory_dict[att.layer_number] = memory
    memory[0][start:end, b0:b0 + b] = key
    memory[1][start:end, b0:b0 + b] = value
    mask_type = AttnMaskType.no_mask if start > 0 else att.attn_mask_type
    core = att.core_attention(query, memory[0][:end, b0:b0 + b], memory[1][:end, b0:b0 + b],
                              attention_mask, attn_mask_type=mask_type, attention_bias=None,
                              packed_seq_params=None)
    # get_bias_dropout_add in eval, as fastpath's bias-dropout-add path computes it.
    hidden = kernels.add_bias_residual_(*_row(att.linear_proj, core), residual)
    hidden = kernels.add_bias_residual_(*_mlp(self.mlp, self.pre_mlp_layernorm(hidden)), hidden)
    return hidden, context


def _direct_call_ok(layer) -> bool:
    """The layer's ``__call__`` would only reach ``forward``: no hooks, no CUDA graphs, no
    per-instance forward."""
    return (_no_hooks(layer) and not hasattr(layer, "cudagraph_manager")
            and type(layer).__call__ is TransformerLayer.__call__ and "forward" not in layer.__dict__)


def block_forward(self, hidden_states, attention_mask, context=None, context_mask=None,
                  rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                  rotary_pos_cos_sin=None, attention_bias=None, inference_context=None,
                  packed_seq_params=None, sequence_len_offset=None, padding_mask=None, **kwargs):
    """``TransformerBlock.forward`` with the static KV cache: the same layer loop calling
    :func:`layer_forward` directly (megatron's loop adds two context managers and three
    ``__call__`` levels of CUDA-graph checks per layer). Without FP8/FP4 contexts, sequence
    parallelism or CPU offloading only; otherwise the original runs."""
    c = self.config
    if (inference_context is None or not inference_context.is_static_batching() or self.training
            or type(self).forward is not TransformerBlock.forward
            or kwargs.get("inference_params") is not None or c.sequence_parallel or c.fp8 or c.fp4
            or c.cpu_offloading):
        return NotImplemented
    if isinstance(hidden_states, WrappedTensor):  # GPTModel passes it so the block can free it
        hidden_states = hidden_states.unwrap()
    if not self.pre_process:
        hidden_states = self.input_tensor
    hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
    args = dict(attention_mask=attention_mask, context=context, context_mask=context_mask,
                rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
                attention_bias=attention_bias, inference_context=inference_context,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                padding_mask=padding_mask)
    for layer in self.layers:
        out = layer_forward(layer, hidden_states, **args) if _direct_call_ok(layer) else NotImplemented
        if out is NotImplemented:
            out = layer(hidden_states=hidden_states, **args)
        hidden_states, args["context"] = out
    if self.final_layernorm is not None:
        hidden_states = self.final_layernorm(hidden_states)
        hidden_states = make_viewless_tensor(inp=hidden_states, requires_grad=True, keep_graph=True)
    if not self.pre_process and len(self.layers) == 0 and not self.final_layernorm:
        hidden_states = hidden_states.clone()
    return hidden_states
