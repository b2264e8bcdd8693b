"""The HF draft-head layout (EAGLE-3 ``LlamaForCausalLMEagle3``, EAGLE ``LlamaForCausalLMEagle``,
Medusa): its config fields (:class:`HeadConfig`), the tensors a config implies and their checks,
and heads made up for a target (tests, cost measurements). No megatron-core, no ModelOpt.

Names are ModelOpt's megatron exporter's (``export/plugins/mcore_llama.py``): ``fc``,
``midlayer.{input_layernorm (the embedding norm), hidden_norm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``norm``, ``lm_head``, ``d2t`` (EAGLE-1:
``layers.0.*``, ``input_layernorm`` for the hidden's norm); Medusa
``medusa_heads.{i}.{j}.linear.{weight,bias}`` and ``medusa_heads.{i}.{layers}.weight``.
``eagle_config.eagle_aux_hidden_state_layer_ids`` keeps ModelOpt's meaning: 0-based target layers
whose OUTPUTS are concatenated (in layer order) as ``fc``'s input.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from post_training.utils import UsageError

__all__ = ["HeadConfig", "check_layout", "check_head_for_target", "read_head_config", "default_aux_layers",
           "head_config_for", "random_head_state"]

EAGLE3_ARCH, EAGLE1_ARCH, MEDUSA_ARCH = "LlamaForCausalLMEagle3", "LlamaForCausalLMEagle", "MedusaModel"


@dataclass
class HeadConfig:
    """The fields of an HF draft-head ``config.json`` this module reads."""

    kind: str  # eagle3 | eagle1 | medusa
    hidden_size: int
    vocab_size: int
    draft_vocab_size: int = 0
    intermediate_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    aux_layer_ids: list[int] = field(default_factory=list)
    use_last_layernorm: bool = True
    use_input_layernorm_in_first_layer: bool = True
    use_mtp_layernorm: bool = False  # EAGLE-1 variant: hnorm on the hidden input (enorm unused)
    medusa_heads: int = 0
    medusa_layers: int = 0

    @classmethod
    def from_hf(cls, cfg: dict) -> "HeadConfig":
        arch = (cfg.get("architectures") or [""])[0]
        if "medusa_num_heads" in cfg or "medusa" in cfg:  # ours / ModelOpt's megatron export's
            m = cfg.get("medusa") or {}
            return cls(kind="medusa", hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"],
                       draft_vocab_size=cfg["vocab_size"],
                       medusa_heads=cfg.get("medusa_num_heads", m.get("num_medusa_heads")),
                       medusa_layers=cfg.get("medusa_num_layers", m.get("num_medusa_layers")))
        ec = cfg.get("eagle_config") or {}
        eagle3 = ec.get("use_aux_hidden_state", "Eagle3" in arch)
        if cfg.get("num_hidden_layers", 1) != 1:
            raise UsageError(f"draft head: {cfg.get('num_hidden_layers')} draft layers; only one-layer "
                             "EAGLE heads are supported")
        heads = cfg["num_attention_heads"]
        return cls(
            kind="eagle3" if eagle3 else "eagle1", hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"],
            draft_vocab_size=cfg.get("draft_vocab_size") or cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"), max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            aux_layer_ids=list(ec.get("eagle_aux_hidden_state_layer_ids") or []),
            use_last_layernorm=ec.get("use_last_layernorm", eagle3),
            use_input_layernorm_in_first_layer=ec.get("use_input_layernorm_in_first_layer", True),
            use_mtp_layernorm=bool(ec.get("use_mtp_layernorm", False)) and not eagle3)

    def to_hf(self) -> dict:
        if self.kind == "medusa":
            return {"architectures": [MEDUSA_ARCH], "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                    "medusa_num_heads": self.medusa_heads, "medusa_num_layers": self.medusa_layers}
        return {
            "architectures": [EAGLE3_ARCH if self.kind == "eagle3" else EAGLE1_ARCH], "model_type": "llama",
            "hidden_act": "silu", "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings, "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size, "tie_word_embeddings": False,
            "eagle_config": {"use_aux_hidden_state": self.kind == "eagle3",
                             "eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids),
                             "use_last_layernorm": self.use_last_layernorm,
                             "use_input_layernorm_in_first_layer": self.use_input_layernorm_in_first_layer,
                             "use_mtp_layernorm": self.use_mtp_layernorm, "next_layer_regular": True},
        }


def names(cfg: HeadConfig) -> tuple[str, str]:
    """(layer prefix, the layer's own input-norm name): ModelOpt exports EAGLE-3 as
    ``midlayer.*`` with that norm as ``hidden_norm``, EAGLE-1 as ``layers.0.*``."""
    return ("midlayer.", "midlayer.hidden_norm.weight") if cfg.kind == "eagle3" else \
        ("layers.0.", "layers.0.input_layernorm.weight")


def _expected(cfg: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the layout (lm_head and fc optional where the forward allows)."""
    h = cfg.hidden_size
    if cfg.kind == "medusa":
        out = {}
        for i in range(cfg.medusa_heads):
            for j in range(cfg.medusa_layers):
                out[f"medusa_heads.{i}.{j}.linear.weight"] = (h, h)
                out[f"medusa_heads.{i}.{j}.linear.bias"] = (h,)
            out[f"medusa_heads.{i}.{cfg.medusa_layers}.weight"] = (cfg.vocab_size, h)
        return out
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    p, hnorm = names(cfg)
    a_in = 2 * h if cfg.kind == "eagle3" else h
    out = {p + "self_attn.q_proj.weight": (q, a_in), p + "self_attn.k_proj.weight": (kv, a_in),
           p + "self_attn.v_proj.weight": (kv, a_in), p + "self_attn.o_proj.weight": (h, q),
           p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
           p + "mlp.up_proj.weight": (cfg.intermediate_size, h), p + "mlp.down_proj.weight": (h, cfg.intermediate_size)}
    if cfg.kind == "eagle3":
        out.update({"fc.weight": (h, len(cfg.aux_layer_ids) * h), p + "input_layernorm.weight": (h,)})
    if cfg.use_input_layernorm_in_first_layer:
        out[hnorm] = (h,)
    if cfg.use_mtp_layernorm:
        out.update({"enorm.weight": (h,), "hnorm.weight": (h,)})
    if cfg.use_last_layernorm:
        out["norm.weight"] = (h,)
    if cfg.draft_vocab_size != cfg.vocab_size:
        out.update({"lm_head.weight": (cfg.draft_vocab_size, h), "d2t": (cfg.draft_vocab_size,)})
    return out


def check_layout(cfg: HeadConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the config implies, with its shape; d2t consistent with the vocabularies."""
    if cfg.kind == "eagle3" and not cfg.aux_layer_ids:
        raise UsageError(f"{where}: an EAGLE-3 head without eagle_aux_hidden_state_layer_ids")
    d2t = state.get("d2t")
    if d2t is not None:
        if d2t.numel() != cfg.draft_vocab_size:
            raise UsageError(f"{where}: d2t has {d2t.numel()} entries, draft_vocab_size is {cfg.draft_vocab_size}")
        t = torch.arange(d2t.numel()) + d2t.long()
        if int(t.min()) < 0 or int(t.max()) >= cfg.vocab_size:
            raise UsageError(f"{where}: d2t maps draft ids outside the target vocabulary (0..{cfg.vocab_size - 1})")
    for name, shape in _expected(cfg).items():
        if name not in state:
            raise UsageError(f"{where}: tensor {name} missing (a {cfg.kind} head)")
        if tuple(state[name].shape) != shape:
            raise UsageError(f"{where}: {name} has shape {tuple(state[name].shape)}, the config implies {shape}")
    if "lm_head.weight" in state and state["lm_head.weight"].shape[0] != cfg.draft_vocab_size:
        raise UsageError(f"{where}: lm_head has {state['lm_head.weight'].shape[0]} rows, draft_vocab_size "
                         f"is {cfg.draft_vocab_size}")
    if "fc.weight" in state and cfg.kind == "eagle1" and state["fc.weight"].shape != (cfg.hidden_size, 2 * cfg.hidden_size):
        raise UsageError(f"{where}: an EAGLE-1 fc must map 2h -> h, got {tuple(state['fc.weight'].shape)}")


def check_head_for_target(cfg: HeadConfig, target_hidden: int, target_vocab: int, target_layers: int,
                          where: str = "draft head") -> None:
    """A head trained for another target (hidden size, vocabulary, aux layers) is refused."""
    if cfg.hidden_size != target_hidden:
        raise UsageError(f"{where}: hidden size {cfg.hidden_size} != the target's {target_hidden} "
                         "(a head of another model)")
    if cfg.vocab_size != target_vocab:
        raise UsageError(f"{where}: vocabulary {cfg.vocab_size} != the target's {target_vocab} "
                         "(a head of another model)")
    bad = [i for i in cfg.aux_layer_ids if not 0 <= i < target_layers]
    if bad:
        raise UsageError(f"{where}: aux layer ids {bad} outside the target's {target_layers} layers")


def read_head_config(path: str | Path) -> HeadConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UsageError(f"draft head: {f} not found (an exported head directory holds config.json + "
                         "model.safetensors)")
    try:
        return HeadConfig.from_hf(json.loads(f.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"draft head: {f} is not a draft-head config ({type(e).__name__}: {e})") from None


def default_aux_layers(num_layers: int) -> list[int]:
    """ModelOpt's default EAGLE-3 aux layers (``_set_default_aux_hidden_state_layers``): the
    outputs of layers {1, L//2 - 1, L - 4} (0-based), duplicates merged, in layer order."""
    return sorted({1, max(0, num_layers // 2 - 1), max(0, num_layers - 4)})


def head_config_for(target: dict, kind: str, draft_vocab_size: int | None = None, **over) -> dict:
    """An HF head config for a target's HF config (one draft layer shaped like the target's,
    the target's RoPE); ``over`` replaces fields (e.g. ``intermediate_size``, ``medusa_heads``)."""
    h, v = target["hidden_size"], target["vocab_size"]
    if kind == "medusa":
        return HeadConfig(kind="medusa", hidden_size=h, vocab_size=v, medusa_heads=over.get("medusa_heads", 3),
                          medusa_layers=over.get("medusa_layers", 1)).to_hf()
    heads = target["num_attention_heads"]
    cfg = HeadConfig(
        kind=kind, hidden_size=h, vocab_size=v, draft_vocab_size=draft_vocab_size or v,
        intermediate_size=target["intermediate_size"], num_attention_heads=heads,
        num_key_value_heads=target.get("num_key_value_heads") or heads,
        head_dim=target.get("head_dim") or h // heads, rms_norm_eps=target.get("rms_norm_eps", 1e-5),
        rope_theta=target.get("rope_theta", 10000.0), rope_scaling=target.get("rope_scaling"),
        max_position_embeddings=target.get("max_position_embeddings", 4096),
        aux_layer_ids=default_aux_layers(target["num_hidden_layers"]) if kind == "eagle3" else [],
        use_last_layernorm=kind == "eagle3")
    for k, val in over.items():
        setattr(cfg, k, val)
    return cfg.to_hf()


def random_head_state(config: dict, seed: int = 0, std: float = 0.05,
                      vocab_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Randomly initialised tensors of the layout ``config`` describes (tests, cost
    measurements). ``vocab_ids``: the target ids of the draft vocabulary (sorted; default: a
    random subset) -> ``d2t``."""
    cfg = HeadConfig.from_hf(config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _expected(cfg).items():
        if name == "d2t":
            ids = vocab_ids if vocab_ids is not None else torch.randperm(cfg.vocab_size, generator=g)[:shape[0]].sort().values
            out[name] = ids.long() - torch.arange(shape[0])
        elif len(shape) == 1:  # norms near one, biases near zero
            base = 0.0 if name.endswith("bias") else 1.0
            out[name] = base + 0.1 * torch.randn(shape, generator=g)
        else:
            out[name] = std * torch.randn(shape, generator=g)
    return out
