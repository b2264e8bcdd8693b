"""Torch-native draft heads in the HF EAGLE-3 / EAGLE / Medusa deployment layout (fp32, CPU-fast;
the layout itself: :mod:`post_training.speculative.head_layout`), loaded from / saved to a head
directory (config.json + model.safetensors).

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
from pathlib import Path

import torch
import torch.nn.functional as F

from post_training.runtime import kernels
from post_training.speculative.head_layout import HeadConfig, check_layout, names, read_head_config
from post_training.utils import UsageError


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
        p, hnorm = names(cfg)
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


def build_head(cfg: HeadConfig, state: dict[str, torch.Tensor], where: str = "draft head"):
    check_layout(cfg, state, where)
    return MedusaDraft(cfg, state) if cfg.kind == "medusa" else EagleDraft(cfg, state)


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
