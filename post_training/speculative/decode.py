"""Lossless speculative generation: a drafter proposes up to K tokens, ONE target forward over
[last token, drafts] against the KV cache scores them all, the longest acceptable prefix is kept
plus one token of the target's own, and the rejected positions are rolled back
(:meth:`KVCache.truncate`).

Greedy: a draft token is kept while it equals the target's argmax, so the output is the target's
greedy output token for token. Sampling (temperature > 0): speculative sampling (Leviathan et
al. 2023, Chen et al. 2023): keep draft x with probability min(1, p(x)/q(x)), on rejection draw
from norm(max(0, p - q)), and draw a bonus token from p when every draft was kept; p is the
warped distribution :func:`post_training.generate.sample` draws from, q the drafter's (one-hot
for deterministic drafters). The output then has plain sampling's distribution.

A drafter that declares ``hidden_spec`` (a trained head: EAGLE, Medusa) gets the target's hidden
states of every appended position through ``feed_hidden(rows, start)`` after each target forward;
the forwards of other drafters carry no capture hooks.

Every rank runs the same loop (see :mod:`post_training.generate`): the last pipeline stage
verifies and broadcasts the kept tokens; drafters see the same context on every rank.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from post_training.config import GenerateConfig
from post_training.generate import sampling_probs, sequence_budget
from post_training.inference import KVCache
from post_training.inference.hidden import HiddenCapture
from post_training.runtime import cpu_compat
from post_training.runtime.collectives import broadcast_from_last_stage
from post_training.utils import UsageError

__all__ = ["SpecStats", "speculative_generate", "verify", "check_model"]


def check_model(model) -> None:
    """Refuse a model whose multi-token verify against the KV cache is not known to be right.
    The toolkit's SDPA attention masks a k-token chunk after a cached prefix bottom-right
    aligned (tests/test_kv_cache.py); other core attentions (Transformer Engine's, megatron's
    local one) were not checked for it: megatron's own static context gave wrong logits for a
    3-token chunk in a probe (docs: GUIDE), so speculative decoding would silently stop being
    lossless."""
    from post_training.attention import SDPAttention

    layers = getattr(getattr(model, "decoder", None), "layers", [])
    bad = {type(l.self_attention.core_attention).__name__ for l in layers
           if not isinstance(l.self_attention.core_attention, SDPAttention)}
    if bad:
        raise UsageError(f"speculative decoding needs the local layer spec's SDPA attention (got "
                         f"{', '.join(sorted(bad))}): run with --transformer-impl local")


@dataclass
class SpecStats:
    """One speculative generation. ``accepted[i]``: draft tokens the target kept at step i
    (0..K; the step emits accepted + 1 tokens, except a last step cut short by a stop id or
    the token budget); ``drafted[i]``: tokens proposed at step i (0..K). A target step is one
    target forward that yields tokens (the prompt's prefill, minus its last token, is not one)."""

    accepted: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    tokens: int = 0  # tokens generated (what the function returns)
    seconds: float = 0.0  # wall time of the whole call, prefill included
    draft_seconds: float = 0.0  # of which the drafter's proposals

    @property
    def steps(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """AL = tokens generated / target steps (1.0 = no speed-up; K + 1 at best)."""
        return self.tokens / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def acceptance_rate(self, draft_steps: int) -> float:
        """AR = (AL - 1) / K: the share of the K draft slots per step that were kept."""
        return (self.acceptance_length - 1) / draft_steps


def verify(logits: torch.Tensor, draft: list[int], cfg: GenerateConfig, gen: torch.Generator | None,
           draft_probs: torch.Tensor | None = None) -> list[int]:
    """The tokens one target step emits: the kept prefix of ``draft`` plus one token of the
    target's (a correction, or a bonus when all were kept). ``logits`` [len(draft) + 1, V]:
    row i is the target's prediction for the slot of draft[i] (the last row: after them all).
    ``draft_probs`` [len(draft), V]: q of each draft; None = one-hot (a deterministic drafter)."""
    if cfg.temperature == 0:
        target = logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(draft) and draft[n] == target[n]:
            n += 1
        return draft[:n] + [target[n]]
    p = sampling_probs(logits, cfg)
    for i, x in enumerate(draft):
        q = draft_probs[i].to(p) if draft_probs is not None else None
        qx = float(q[x]) if q is not None else 1.0
        u = float(torch.rand(1, generator=gen, device=p.device))
        if qx > 0 and u < float(p[i, x]) / qx:  # u < min(1, p/q) since u < 1
            continue
        if q is None:  # residual of a one-hot q: p without x
            residual = p[i].clone()
            residual[x] = 0
        else:
            residual = (p[i] - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q exactly: rejection had probability 0
            residual = p[i]
        tok = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
        return draft[:i] + [tok]
    return draft + [int(torch.multinomial(p[len(draft)], 1, generator=gen))]


@torch.inference_mode()
def speculative_generate(model, prompt_ids: list[int], drafter, gcfg: GenerateConfig, draft_steps: int,
                         max_seq_length: int | None = None, seed: int = 1234) -> tuple[list[int], SpecStats]:
    """Generate up to ``gcfg.max_new_tokens`` tokens after ``prompt_ids`` with ``drafter``
    (a :class:`~post_training.speculative.drafters.Drafter`, or None: plain decoding through the
    same loop) proposing up to ``draft_steps`` tokens per target step. Same contract as
    :func:`post_training.generate.generate` (stops right after a stop id, never more than
    max_new_tokens, sampling seeded with ``seed``); returns (tokens, stats)."""
    if draft_steps < 1:
        raise UsageError(f"--draft-steps must be >= 1 (got {draft_steps})")
    if not prompt_ids:
        raise UsageError("speculative generation needs a non-empty prompt")
    check_model(model)
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    budget = gcfg.max_new_tokens
    total = sequence_budget(len(prompt_ids), budget, max_seq_length)
    # A step drafts at most (tokens still allowed - 1), so the cache never holds more than
    # prompt + max_new_tokens - 1 positions: the same capacity as plain generation.
    cache = KVCache(max_batch_size=1, max_sequence_length=total)
    gen = torch.Generator(device=device).manual_seed(seed) if gcfg.temperature > 0 else None
    stops = set(gcfg.stop_token_ids)
    stats = SpecStats()
    context = list(prompt_ids)
    out: list[int] = []
    if drafter is not None:
        drafter.reset(list(prompt_ids))
    # Emitted tokens travel as [count, t_1 .. t_count] in a fixed-size buffer (same on all ranks).
    buf = torch.zeros(draft_steps + 2, dtype=torch.long, device=device)
    spec = getattr(drafter, "hidden_spec", None)

    def forward(tokens: list[int], all_logits: bool = False):
        inp = torch.tensor([tokens], dtype=torch.long, device=device)
        if spec is None:
            return cache.forward(model, inp, all_logits=all_logits)
        start = cache.length
        with HiddenCapture(model, spec) as cap:
            logits = cache.forward(model, inp, all_logits=all_logits)
        drafter.feed_hidden(cap.result(len(tokens), 1)[:, 0], start)
        return logits

    with cpu_compat.device_mode_suspended():
        if len(prompt_ids) > 1:  # the prompt minus its last token: no logits needed
            forward(prompt_ids[:-1])
        pending = prompt_ids[-1]  # the one token not yet in the cache
        while True:
            k = min(draft_steps, budget - len(out) - 1)
            draft: list[int] = []
            if drafter is not None and k > 0:
                t0 = time.perf_counter()
                draft = list(drafter.propose(context, k))[:k]
                stats.draft_seconds += time.perf_counter() - t0
            probs = getattr(drafter, "draft_probs", None) if draft else None
            base = cache.length
            logits = forward([pending] + draft, all_logits=bool(draft))
            buf.zero_()
            if logits is not None:
                new = verify(logits[0, -(len(draft) + 1):], draft, gcfg, gen,
                             probs[:len(draft)] if probs is not None else None)
                buf[0] = len(new)
                buf[1:len(new) + 1] = torch.tensor(new, dtype=torch.long)
            broadcast_from_last_stage(buf)
            new = buf[1:int(buf[0]) + 1].tolist()
            n_acc = len(new) - 1
            cache.truncate(base + 1 + n_acc)  # keep pending + the accepted drafts
            stats.accepted.append(n_acc)
            stats.drafted.append(len(draft))
            done = False
            for tok in new:
                out.append(tok)
                if tok in stops or len(out) >= budget:
                    done = True
                    break
            context.extend(new)
            if drafter is not None:
                drafter.accept(n_acc, context)
            if done:
                break
            pending = new[-1]
    stats.tokens = len(out)
    stats.seconds = time.perf_counter() - t_start
    return out, stats
