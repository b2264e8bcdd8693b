"""Megatron (megatron-core GPT) parameter names -> Hugging Face Llama / Qwen2 / Qwen3 / Mistral.

Both checkpoint kinds reach this module as *global* tensors (all TP ranks merged, one layer at
a time): a dist checkpoint stores them that way already, a legacy checkpoint is merged by
:func:`merge_tp`. What is left is the layout megatron-core uses for a full tensor:

- ``linear_qkv`` rows are interleaved per query group: ``[q_g (heads/groups rows of head_dim),
  k_g, v_g]`` for each group g;
- ``linear_fc1`` is ``[gate; up]`` (the SwiGLU sharded factory stores the gate halves of every
  TP rank before the up halves; a single rank holds ``[gate_r; up_r]``);
- the pre-attention / pre-MLP RMSNorm weights are fused into ``linear_qkv`` / ``linear_fc1`` as
  ``layer_norm_weight`` (TE spec, and the key map of the local spec) or kept as
  ``input_layernorm`` / ``pre_mlp_layernorm`` (a local-spec ``state_dict()``);
- embedding and output rows may be padded past the tokenizer's vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from post_training.utils import UsageError

Tensor = torch.Tensor
LAYER_PREFIX = "decoder.layers."
GLOBAL_NAMES = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")
# Per-layer names (after ``decoder.layers.<i>.``) and their aliases, first match wins.
INPUT_NORM = ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight")
MLP_NORM = ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")
UNSUPPORTED = ("mlp.router", "mlp.experts", "mlp.shared_experts", "cross_attention", "linear_q_down_proj")


@dataclass(frozen=True)
class Dims:
    """What the mapping needs from the HF config."""

    layers: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: Any) -> "Dims":
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(layers=cfg.num_hidden_layers, heads=heads,
                   groups=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)))


@dataclass(frozen=True)
class Unit:
    """One megatron tensor and the HF tensors it becomes."""

    mcore: str  # global name, or per-layer name when ``layer`` is set
    layer: int | None
    hf: tuple[str, ...]
    split: Callable[[Tensor], list[Tensor]]


def _qkv(d: Dims) -> Callable[[Tensor], list[Tensor]]:
    per = d.heads // d.groups

    def split(t: Tensor) -> list[Tensor]:
        rest = t.shape[1:]
        g = t.reshape(d.groups, per + 2, d.head_dim, *rest)
        return [g[:, :per].reshape(-1, *rest), g[:, per].reshape(-1, *rest), g[:, per + 1].reshape(-1, *rest)]

    return split


def _vocab(d: Dims) -> Callable[[Tensor], list[Tensor]]:
    def trim(t: Tensor) -> list[Tensor]:
        if t.shape[0] < d.vocab:
            raise UsageError(f"checkpoint vocabulary ({t.shape[0]} rows) is smaller than the config's "
                             f"vocab_size {d.vocab}: wrong --hf-config?")
        return [t[: d.vocab]]  # megatron pads the vocabulary to a multiple of 128 * TP

    return trim


def _same(t: Tensor) -> list[Tensor]:
    return [t]


def _halves(t: Tensor) -> list[Tensor]:
    return list(torch.chunk(t, 2, dim=0))


def plan_units(d: Dims, has: Callable[[str], bool]) -> list[Unit]:
    """Every unit in HF order (embedding, layers, norm, head). ``has(name)`` says whether the
    checkpoint holds a per-layer (``decoder.layers.*``) or global megatron name."""
    for name in UNSUPPORTED:
        if has(name):
            raise UsageError(f"the checkpoint has {LAYER_PREFIX}{name}: mixture-of-experts / MLA / "
                             "cross-attention models are not supported by consolidate")

    def pick(names: tuple[str, ...]) -> str:
        for n in names:
            if has(n):
                return n
        raise UsageError(f"the checkpoint has no {LAYER_PREFIX}{names[0]}: not a GPT (Llama-family) model")

    units = [Unit("embedding.word_embeddings.weight", None, ("model.embed_tokens.weight",), _vocab(d))]
    for i in range(d.layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        units.append(Unit(pick(INPUT_NORM), i, (f"model.layers.{i}.input_layernorm.weight",), _same))
        units.append(Unit(pick(("self_attention.linear_qkv.weight",)), i,
                          (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), _qkv(d)))
        if has("self_attention.linear_qkv.bias"):
            units.append(Unit("self_attention.linear_qkv.bias", i,
                              (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), _qkv(d)))
        units.append(Unit(pick(("self_attention.linear_proj.weight",)), i, (a + "o_proj.weight",), _same))
        if has("self_attention.linear_proj.bias"):
            units.append(Unit("self_attention.linear_proj.bias", i, (a + "o_proj.bias",), _same))
        for mc, hf in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            if has(f"self_attention.{mc}.weight"):
                units.append(Unit(f"self_attention.{mc}.weight", i, (a + f"{hf}.weight",), _same))
        units.append(Unit(pick(MLP_NORM), i, (f"model.layers.{i}.post_attention_layernorm.weight",), _same))
        units.append(Unit(pick(("mlp.linear_fc1.weight",)), i, (m + "gate_proj.weight", m + "up_proj.weight"),
                          _halves))
        if has("mlp.linear_fc1.bias"):
            units.append(Unit("mlp.linear_fc1.bias", i, (m + "gate_proj.bias", m + "up_proj.bias"), _halves))
        units.append(Unit(pick(("mlp.linear_fc2.weight",)), i, (m + "down_proj.weight",), _same))
        if has("mlp.linear_fc2.bias"):
            units.append(Unit("mlp.linear_fc2.bias", i, (m + "down_proj.bias",), _same))
    units.append(Unit("decoder.final_layernorm.weight", None, ("model.norm.weight",), _same))
    if not d.tied:
        if not has("output_layer.weight"):
            raise UsageError("the config has untied embeddings but the checkpoint has no output_layer.weight")
        units.append(Unit("output_layer.weight", None, ("lm_head.weight",), _vocab(d)))
    return units


def stream(units: list[Unit], read: Callable[[list[Unit]], list[Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """HF tensors in plan order; ``read`` gets the units of one layer (or one global tensor) at
    a time, so at most one layer's megatron tensors are in memory."""
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and units[i].layer is not None and units[j].layer == units[i].layer:
            j += 1
        batch = units[i:j]
        for unit, t in zip(batch, read(batch)):
            parts = unit.split(t)
            del t
            yield from zip(unit.hf, parts)
        i = j


# ----------------------------------------------------------------------------- legacy TP merge


def _swiglu_cat(parts: list[Tensor]) -> Tensor:
    # Each rank holds [gate_r; up_r]: the global tensor is [gate_0 .. gate_n; up_0 .. up_n].
    halves = [torch.chunk(p, 2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def merge_tp(name: str, parts: list[Tensor]) -> Tensor:
    """One tensor from its TP-rank slices (megatron's parallel-linear conventions)."""
    if len(parts) == 1:
        return parts[0]
    leaf = name.rsplit(".", 2)[-2:]
    module, kind = leaf[0], leaf[1]
    if module == "linear_fc1" and kind in ("weight", "bias"):
        return _swiglu_cat(parts)
    if module in ("linear_qkv", "word_embeddings", "output_layer") and kind in ("weight", "bias"):
        return torch.cat(parts, dim=0)  # column-parallel (vocab-parallel for embeddings)
    if module in ("linear_proj", "linear_fc2") and kind == "weight":
        return torch.cat(parts, dim=1)  # row-parallel
    # Replicated (norms, row-parallel biases): every rank has the same values.
    for p in parts[1:]:
        if p.shape != parts[0].shape:
            raise UsageError(f"TP ranks disagree on the shape of replicated tensor {name}")
    return parts[0]


def hf_config_from_args(args: dict) -> dict:
    """An HF config.json for a Megatron-LM ``args`` (a legacy checkpoint saved without a
    config). Architecture follows the features: q/k norm -> Qwen3, QKV bias -> Qwen2, else Llama."""
    need = ("num_layers", "hidden_size", "num_attention_heads")
    if missing := [k for k in need if args.get(k) is None]:
        raise UsageError(f"checkpoint args lack {', '.join(missing)}: pass --hf-config DIR")
    if args.get("normalization", "RMSNorm") != "RMSNorm" or not args.get("swiglu", True):
        raise UsageError("only RMSNorm + SwiGLU (Llama-family) models can be consolidated")
    heads = args["num_attention_heads"]
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    arch, model_type = (("Qwen3ForCausalLM", "qwen3") if args.get("qk_layernorm") else
                        ("Qwen2ForCausalLM", "qwen2") if args.get("add_qkv_bias") else
                        ("LlamaForCausalLM", "llama"))
    dtype = str(args.get("params_dtype", torch.float32)).removeprefix("torch.")
    cfg = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": args.get("padded_vocab_size") or args.get("vocab_size"),
        "hidden_size": args["hidden_size"], "intermediate_size": args.get("ffn_hidden_size") or 4 * args["hidden_size"],
        "num_hidden_layers": args["num_layers"], "num_attention_heads": heads,
        "num_key_value_heads": groups or heads,
        "head_dim": args.get("kv_channels") or args["hidden_size"] // heads,
        "rms_norm_eps": args.get("norm_epsilon", 1e-5), "hidden_act": "silu",
        "max_position_embeddings": args.get("max_position_embeddings") or args.get("seq_length") or 4096,
        "rope_theta": float(args.get("rotary_base", 10000)),
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
        "attention_bias": bool(args.get("add_qkv_bias")), "dtype": dtype,
    }
    if cfg["vocab_size"] is None:
        raise UsageError("checkpoint args lack the vocabulary size: pass --hf-config DIR")
    return cfg
