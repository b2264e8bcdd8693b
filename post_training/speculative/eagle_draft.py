"""Torch-native draft heads in the HF EAGLE-3 / EAGLE / Medusa deployment layout (fp32, CPU-fast).

The forward is ModelOpt's megatron plugin's (``megatron_eagle.EagleModule`` and
``pseudo_speculative_generate``), which is what a head trained by ModelOpt expects:

* entry ``i`` of the draft sequence pairs the target's hidden state at position ``i`` with the
  token at ``i + 1`` and sits at rotary position ``i``; its logits predict the token at ``i + 2``;
* EAGLE-3: ``x = fc(cat(aux hiddens))`` (3h -> h), the (only) layer's attention input is
  ``cat(enorm(embed(token)), hidden_norm(x))`` (2h; ``midlayer.input_layernorm`` is enorm,
  ``midlayer.hidden_norm`` the layer's own input norm), the residual is ``x``; then
  post-attention norm + SwiGLU MLP, the final ``norm`` (``use_last_layernorm``), ``lm_head``
  over the draft vocabulary, ``target id = draft id + d2t[draft id]``. The next chain step's
  hidden is the layer output BEFORE the final norm (ModelOpt's hook on the last layer) and gets
  no ``fc``;
* EAGLE-1 (ModelOpt's megatron flavour, no aux layers): no ``fc`` and no token embedding; the
  layer runs on the target's final-normed hidden state; the next hidden is the module output.
  An original-EAGLE ``fc`` (2h -> h over ``cat(embed, hidden)``) is honoured when present.
* Medusa: head ``i`` (``x = x + silu(W x + b)`` per layer, then its ``lm_head``) reads the
  final-normed hidden at position ``p`` and predicts the token at ``p + 2 + i``.

Rotary is HF / megatron llama RoPE (non-interleaved, ``rope_theta``, optional llama3 scaling) of
the draft's own config: the one it was trained with.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from post_training.runtime import kernels
from post_training.utils import UsageError

__all__ = ["HeadConfig", "EagleDraft", "MedusaDraft", "load_draft_head", "save_draft_head",
           "check_head_for_target"]

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


def _names(cfg: HeadConfig) -> tuple[str, str]:
    """(layer prefix, the layer's own input-norm name): ModelOpt exports EAGLE-3 as
    ``midlayer.*`` with that norm as ``hidden_norm``, EAGLE-1 as ``layers.0.*``."""
    return ("midlayer.", "midlayer.hidden_norm.weight") if cfg.kind == "eagle3" else \
        ("layers.0.", "layers.0.input_layernorm.weight")


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def inv_freq(cfg: HeadConfig) -> torch.Tensor:
    """RoPE inverse frequencies: HF's default, or llama3 scaling (megatron's defaults for the
    keys a config leaves out)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "llama3":
        factor, lo, hi = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise UsageError(f"draft head: rope_scaling type {kind!r} is not supported (default, llama3)")
    return inv.float()


class EagleDraft:
    """One EAGLE-3 / EAGLE-1 draft layer with its own KV cache (fp32). :meth:`append` adds
    entries at the cache's end and returns their logits and next-step hiddens; :meth:`truncate`
    drops rejected entries (their keys / values must not stay visible)."""

    def __init__(self, cfg: HeadConfig, state: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.state = state
        w = {k: v.float().contiguous() for k, v in state.items() if k != "d2t"}
        p, hnorm = _names(cfg)
        self.fc = w.get("fc.weight")
        self.enorm = w.get("midlayer.input_layernorm.weight")
        self.hnorm = w.get(hnorm)
        self.mtp_hnorm = w.get("hnorm.weight") if cfg.use_mtp_layernorm else None
        self.q, self.k, self.v = (w[f"{p}self_attn.{n}_proj.weight"] for n in "qkv")
        self.o = w[p + "self_attn.o_proj.weight"]
        self.post_norm = w[p + "post_attention_layernorm.weight"]
        self.gate, self.up, self.down = (w[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        self.norm = w.get("norm.weight")
        self.lm_head = w.get("lm_head.weight")  # None: the target's output layer (set by the drafter)
        d2t = state.get("d2t")
        self.d2t = d2t.long() if d2t is not None else None
        self.freqs = inv_freq(cfg)
        self.length = 0
        self.kc = self.vc = None

    @property
    def aux_width(self) -> int:
        return self.fc.shape[1] if self.cfg.kind == "eagle3" else self.cfg.hidden_size

    def project(self, aux: torch.Tensor) -> torch.Tensor:
        """Target hiddens [n, aux_width] -> the layer's hidden input [n, h] (EAGLE-3's fc)."""
        return kernels.linear(aux, self.fc) if self.cfg.kind == "eagle3" else aux

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def _cache(self, end: int) -> None:
        c = self.cfg
        if self.kc is None or end > self.kc.shape[0]:
            cap = max(end, 2 * (self.kc.shape[0] if self.kc is not None else 128))
            kc = torch.zeros(cap, c.num_key_value_heads, c.head_dim)
            vc = torch.zeros_like(kc)
            if self.kc is not None:
                kc[:self.length], vc[:self.length] = self.kc[:self.length], self.vc[:self.length]
            self.kc, self.vc = kc, vc

    def _rope(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ang = pos.float()[:, None] * self.freqs[None]  # [n, d/2]
        emb = torch.cat((ang, ang), dim=-1)[:, None]  # [n, 1, d]
        half = t.shape[-1] // 2
        rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * emb.cos() + rot * emb.sin()

    def append(self, emb: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries at positions ``length .. length + n - 1``: ``emb`` [n, h] the target's token
        embeddings, ``x`` [n, h] the hidden inputs (:meth:`project`-ed target hiddens or earlier
        next-hiddens). Returns (logits [n, draft_vocab], next hiddens [n, h])."""
        c, n, start = self.cfg, x.shape[0], self.length
        eps = c.rms_norm_eps
        if self.mtp_hnorm is not None:  # ModelOpt normalises the hidden input itself (the residual too)
            x = _rms(x, self.mtp_hnorm, eps)
        h_in = _rms(x, self.hnorm, eps) if self.hnorm is not None else x
        if c.kind == "eagle3":
            a = torch.cat((_rms(emb, self.enorm, eps), h_in), dim=-1)
        elif self.fc is not None:  # original EAGLE: fc over [embed; hidden], then the layer
            x = kernels.linear(torch.cat((emb, x), dim=-1), self.fc)
            a = _rms(x, self.hnorm, eps) if self.hnorm is not None else x
        else:
            a = h_in
        hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        pos = torch.arange(start, start + n)
        q = self._rope(kernels.linear(a, self.q).view(n, nh, hd), pos)
        k = self._rope(kernels.linear(a, self.k).view(n, nkv, hd), pos)
        v = kernels.linear(a, self.v).view(n, nkv, hd)
        end = start + n
        self._cache(end)
        self.kc[start:end], self.vc[start:end] = k, v
        keys = self.kc[:end].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)  # [nh, end, hd]
        vals = self.vc[:end].transpose(0, 1).repeat_interleave(nh // nkv, dim=0)
        mask = None
        if n > 1:  # bottom-right causal: query j sees keys up to start + j
            mask = torch.arange(end)[None, :] <= (start + torch.arange(n))[:, None]
        att = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask)
        x = x + kernels.linear(att.transpose(0, 1).reshape(n, nh * hd), self.o)
        m = _rms(x, self.post_norm, eps)
        x = x + kernels.linear(F.silu(kernels.linear(m, self.gate)) * kernels.linear(m, self.up), self.down)
        self.length = end
        out = _rms(x, self.norm, eps) if (c.use_last_layernorm and self.norm is not None) else x
        logits = kernels.linear(out, self.lm_head)
        return logits, (x if c.kind == "eagle3" else out)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids] if self.d2t is not None else draft_ids


class MedusaDraft:
    """Medusa heads: ``heads[i]`` maps the final-normed hidden at p to logits for p + 2 + i."""

    def __init__(self, cfg: HeadConfig, state: dict[str, torch.Tensor]) -> None:
        self.cfg, self.state = cfg, state
        L = cfg.medusa_layers
        self.heads = []
        for i in range(cfg.medusa_heads):
            layers = [(state[f"medusa_heads.{i}.{j}.linear.weight"].float(),
                       state[f"medusa_heads.{i}.{j}.linear.bias"].float()) for j in range(L)]
            self.heads.append((layers, state[f"medusa_heads.{i}.{L}.weight"].float()))

    def logits(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """h [h] -> [min(n, heads), V]."""
        out = []
        for layers, lm_head in self.heads[:n]:
            x = h
            for w, b in layers:
                x = x + F.silu(kernels.linear(x, w, b))
            out.append(kernels.linear(x, lm_head))
        return torch.stack(out) if out else h.new_zeros(0, self.cfg.vocab_size)


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
    p, hnorm = _names(cfg)
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


def build_head(cfg: HeadConfig, state: dict[str, torch.Tensor], where: str = "draft head"):
    check_layout(cfg, state, where)
    return MedusaDraft(cfg, state) if cfg.kind == "medusa" else EagleDraft(cfg, state)


def read_head_config(path: str | Path) -> HeadConfig:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UsageError(f"draft head: {f} not found (an exported head directory holds config.json + "
                         "model.safetensors)")
    try:
        return HeadConfig.from_hf(json.loads(f.read_text()))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UsageError(f"draft head: {f} is not a draft-head config ({type(e).__name__}: {e})") from None


def load_draft_head(path: str | Path) -> EagleDraft | MedusaDraft:
    """An exported head directory (config.json + model.safetensors) -> the native head."""
    from safetensors.torch import load_file

    cfg = read_head_config(path)
    f = Path(path) / "model.safetensors"
    if not f.is_file():
        raise UsageError(f"draft head: {f} not found")
    return build_head(cfg, load_file(str(f)), where=f"draft head {path}")


def save_draft_head(config: dict, state: dict[str, torch.Tensor], out: str | Path, overwrite: bool = True) -> Path:
    """Write ``config`` (HF draft-head config) and ``state`` (the layout's tensors) to ``out``
    atomically; the tensors are checked against the config first."""
    from post_training.io.atomic import staged_dir
    from post_training.io.safetensors_io import ShardWriter

    cfg = HeadConfig.from_hf(config)
    check_layout(cfg, state, "draft head")
    with staged_dir(out, overwrite, "draft head dir") as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        w = ShardWriter(tmp)
        for name in sorted(state):
            w.add(name, state[name].detach().contiguous().cpu())
        w.finish()
    return Path(out)


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
