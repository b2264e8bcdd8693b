"""The trained draft head in the HF deployment layout (what vLLM / SGLang / the toolkit's own
drafter read): :func:`draft_head_state` ``(model) -> (config, state)``, full tensors (TP shards
gathered), collective over the TP group.

Names follow ModelOpt's megatron exporter rules (``export/plugins/mcore_llama.py``:
``eagle3_llama_causal_lm_export``, ``eagle_llama_causal_lm_export``,
``medusa_llama_causal_lm_export``); ModelOpt's exporter misses ``d2t`` (it tests for an attribute
``dt2``), it is written here.

EAGLE-3 (``LlamaForCausalLMEagle3``), exactly what ModelOpt 0.47's megatron plugin computes in
training (``_DynamicEagleGPTModel.forward``), one draft layer, target tokens ``x_0..x_{s-1}`` at
positions ``0..s-1``:

* aux hidden states: the outputs of the target's layers ``eagle_aux_hidden_state_layer_ids``
  (0-based; default ``{1, L//2-1, L-4}``), each the residual stream after that layer, before the
  final norm, concatenated along the hidden dimension in ascending layer order: ``[k*h]``;
  ``g_t = fc(cat(aux_t))`` (``fc.weight`` ``[h, k*h]``, no bias). fc is applied to target
  hidden states only, never to the draft's own outputs.
* token input: row ``t`` pairs ``g_t`` (target position ``t``) with the embedding of the NEXT
  token ``x_{t+1}`` (the target's own, frozen ``embed_tokens``; the last row gets token id 0 and
  is masked). ``e_t = input_layernorm(embed(x_{t+1}))`` (``midlayer.input_layernorm``, RMSNorm).
* layer: ``r = g_t``; ``u = hidden_norm(g_t)`` (``midlayer.hidden_norm``);
  attention input ``cat([e_t, u])`` (embedding FIRST, then hidden; ``q/k/v_proj`` are
  ``[*, 2h]``); RoPE with the target's ``rope_theta`` / ``rope_scaling`` at position ``t`` (the
  position of the target hidden state, not ``t+1``), causal; ``r = r + o_proj(attn)``;
  ``r = r + mlp(post_attention_layernorm(r))`` (SwiGLU: ``down(silu(gate(x)) * up(x))``).
  ``z_t = r`` is the pre-norm output; ``logits_t = lm_head(norm(z_t))`` over the draft vocab
  (``norm``: ``use_last_layernorm``), draft token ``y = argmax + d2t[argmax]``, the prediction of
  ``x_{t+2}``; trained towards the target's distribution at position ``t+1`` restricted to the
  draft vocab and renormalised (soft cross entropy), weight ``0.9^i`` for TTT step ``i``.
* positions are row indices of the sequence the target saw: the draft's rotary ignores
  ``position_ids`` (with packed documents and ``--reset-position-ids`` the target restarts its
  positions per document, the draft does not); the target's attention mask (causal, or the
  packed block-diagonal one) is the draft's, shifted with the rows and with the last row and
  key masked.
* TTT step ``i >= 1``: the hidden input of row ``t`` is ``z^{(i-1)}_{t-1}`` (the previous step's
  pre-norm output one row up, zeros at row 0; no fc, no aux), the token input stays
  ``embed(x_{t+1})``, the query position stays ``t``. Row ``t`` of step ``i`` is thus the
  ``(i+1)``-th draft token of the chain started from target position ``t-i``; it attends the
  step-0 keys of positions ``<= t-i`` (the real context, computed from target hidden states)
  plus that chain's own keys of steps ``1..i`` at positions ``t-i+1..t`` (each key roped at its
  row's position). At inference: draft step 1 at position ``p`` (last verified target hidden
  ``g_p``, token ``x_{p+1}``) attends the draft KV cache of positions ``<= p``; step ``k`` feeds
  ``z`` of step ``k-1`` with the embedding of the token step ``k-1`` drafted, at position
  ``p+k-1``, and appends its key there.

EAGLE-1 (``LlamaForCausalLMEagle``, ModelOpt's default EAGLE config): no aux states, no fc, no
``enorm``. The draft layer's input is the target's final hidden state ``h_t`` (after the final
norm) -- ModelOpt 0.47's megatron module computes the next-token embedding but does not use it
(only its ``use_mtp_layernorm`` variant normalises it, and still drops it) -- through a standard
Llama layer (``layers.0.input_layernorm`` applied to ``h_t``, the same residual as above), no
final norm (``use_last_layernorm`` false), logits through the target's own ``lm_head`` (frozen;
a draft vocabulary gives the head its own ``lm_head`` + ``d2t``). TTT as above.

Medusa (``MedusaModel``): head ``i`` maps the target's final hidden ``h_t`` through
``medusa_num_layers`` residual blocks ``x = x + silu(linear(x))`` (with bias) and its own
``lm_head`` (full vocab, no bias) to the prediction of ``x_{t+2+i}`` (hard-label cross entropy).
Names: ``medusa_heads.{i}.{j}.linear.weight/bias``, ``medusa_heads.{i}.{num_layers}.weight``
(ModelOpt's rule, the lm_head after the blocks as in Medusa's ``nn.Sequential``).
"""
from __future__ import annotations

from typing import Any

import torch

from post_training.runtime.collectives import tp_all_gather
from post_training.speculative.heads import _unwrap, draft_kind
from post_training.utils import UsageError

EAGLE_CONFIG_KEYS = ("eagle_aux_hidden_state_layer_ids", "use_aux_hidden_state",
                     "use_input_layernorm_in_first_layer", "use_last_layernorm", "use_mtp_layernorm",
                     "parallel_draft_step", "has_lm_head")


def _mode_config(model, mode: str) -> dict:
    import modelopt.torch.opt as mto

    for name, state in mto.modelopt_state(model)["modelopt_state_dict"]:
        if name == mode:
            return dict(state.get("config", {}))
    return {}


def _w(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone() if t.dtype == torch.float32 else t.detach().cpu().clone()


def _column(linear) -> torch.Tensor:
    return _w(tp_all_gather(linear.weight, 0))


def _row(linear) -> torch.Tensor:
    return _w(tp_all_gather(linear.weight, 1))


def _qkv(linear, cfg) -> dict[str, torch.Tensor]:
    """megatron's fused QKV ``[groups x (q heads of the group, k, v) x head_dim, in]`` -> q/k/v."""
    w = tp_all_gather(linear.weight, 0)
    ng, hn = cfg.num_query_groups, cfg.kv_channels
    per = cfg.num_attention_heads // ng
    w = w.view(ng, per + 2, hn, w.shape[-1])
    return {"q_proj.weight": _w(w[:, :per].reshape(-1, w.shape[-1])),
            "k_proj.weight": _w(w[:, per].reshape(-1, w.shape[-1])),
            "v_proj.weight": _w(w[:, per + 1].reshape(-1, w.shape[-1]))}


def _gated_fc1(linear) -> dict[str, torch.Tensor]:
    """SwiGLU fc1: each TP rank holds [gate shard; up shard]."""
    gate, up = linear.weight.chunk(2, dim=0)
    return {"gate_proj.weight": _w(tp_all_gather(gate, 0)), "up_proj.weight": _w(tp_all_gather(up, 0))}


def _layer(layer, cfg, prefix: str, first_norm: str | None) -> dict[str, torch.Tensor]:
    from megatron.core.transformer.identity_op import IdentityOp

    attn, mlp = layer.self_attention, layer.mlp
    out = {}
    if first_norm and not isinstance(layer.input_layernorm, IdentityOp):
        out[f"{prefix}{first_norm}.weight"] = _w(layer.input_layernorm.weight)
    out.update({f"{prefix}self_attn.{k}": v for k, v in _qkv(attn.linear_qkv, cfg).items()})
    out[f"{prefix}self_attn.o_proj.weight"] = _row(attn.linear_proj)
    out[f"{prefix}post_attention_layernorm.weight"] = _w(layer.pre_mlp_layernorm.weight)
    out.update({f"{prefix}mlp.{k}": v for k, v in _gated_fc1(mlp.linear_fc1).items()})
    out[f"{prefix}mlp.down_proj.weight"] = _row(mlp.linear_fc2)
    return out


def _eagle(model) -> tuple[dict, dict]:
    em, cfg = model.eagle_module, model.eagle_config
    arch = dict(_mode_config(model, "eagle").get("eagle_architecture_config", {}))
    eagle3 = bool(cfg.use_aux_hidden_state)
    layers = list(em.decoder.layers)
    state: dict[str, torch.Tensor] = {}
    if eagle3:
        state["fc.weight"] = _w(em.fc.weight)
        state["midlayer.input_layernorm.weight" if len(layers) == 1 else
              "midlayer.0.input_layernorm.weight"] = _w(em.enorm.weight)
    elif cfg.use_mtp_layernorm:
        state["enorm.weight"], state["hnorm.weight"] = _w(em.enorm.weight), _w(em.hnorm.weight)
    for i, layer in enumerate(layers):
        if eagle3:
            prefix = "midlayer." if len(layers) == 1 else f"midlayer.{i}."
            state.update(_layer(layer, cfg, prefix, "hidden_norm"))
        else:
            state.update(_layer(layer, cfg, f"layers.{i}.", "input_layernorm"))
    if cfg.use_last_layernorm:
        state["norm.weight"] = _w(em.decoder.final_layernorm.weight)
    if hasattr(em, "eagle_output_layer"):
        state["lm_head.weight"] = _column(em.eagle_output_layer)
    if hasattr(em, "d2t"):
        state["d2t"] = em.d2t.detach().cpu().clone()
    arch_name = ("LlamaForCausalLMEagle3" if len(layers) == 1 else "LlamaForCausalLMEagle3Deep") \
        if eagle3 else "LlamaForCausalLMEagle"
    rope_scaling = arch.get("rope_scaling")
    config = {
        "architectures": [arch_name],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": len(layers),
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": float(arch.get("rope_theta", cfg.rotary_base)),
        "rope_scaling": rope_scaling if (rope_scaling or {}).get("rope_type", "default") != "default" else None,
        "max_position_embeddings": int(model.max_sequence_length),  # the target's (see heads)
        "vocab_size": int(model.vocab_size),
        "draft_vocab_size": int(cfg.draft_vocab_size),
        "tie_word_embeddings": False,
        "torch_dtype": str(cfg.params_dtype).removeprefix("torch."),
        "eagle_config": {k: getattr(cfg, k) for k in EAGLE_CONFIG_KEYS},
    }
    config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = \
        sorted(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] or [])
    config["eagle_config"]["eagle_ttt_steps"] = int(model.eagle_ttt_steps)
    return config, state


def _medusa(model) -> tuple[dict, dict]:
    state: dict[str, torch.Tensor] = {}
    n_layers = int(model.medusa_num_layers)
    for i, head in enumerate(model.medusa_heads):
        for j, layer in enumerate(head.medusa_layers):
            state[f"medusa_heads.{i}.{j}.linear.weight"] = _w(layer.linear.weight)
            state[f"medusa_heads.{i}.{j}.linear.bias"] = _w(layer.linear.bias)
        state[f"medusa_heads.{i}.{n_layers}.weight"] = _column(head.lm_head)
    config = {"architectures": ["MedusaModel"], "medusa_num_heads": int(model.medusa_num_heads),
              "medusa_num_layers": n_layers, "hidden_size": int(model.config.hidden_size),
              "vocab_size": int(model.vocab_size),
              "torch_dtype": str(model.config.params_dtype).removeprefix("torch.")}
    return config, state


def draft_head_state(model: Any, hf_config: Any = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of the model's draft head in the HF deployment layout (module
    docstring), on every rank. ``hf_config``: the target's HF config, whose
    ``max_position_embeddings`` then goes into the config (default: the model's maximum
    sequence length, which is at least that)."""
    model = _unwrap(model)
    kind = draft_kind(model)
    if kind is None or not getattr(model, "post_process", True):
        raise UsageError("the model has no draft head (on this pipeline stage)")
    config, state = _eagle(model) if kind == "eagle" else _medusa(model)
    if hf_config is not None and kind == "eagle":
        get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
        config["max_position_embeddings"] = int(get("max_position_embeddings", config["max_position_embeddings"]))
    return config, state
