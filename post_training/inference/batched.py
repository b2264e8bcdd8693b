"""Batched generation: many prompts through one static KV cache, at any TP/PP.

Prompts of different lengths are *left*-padded to the longest, so every row's last prompt
token sits at the same cache position and one forward per step serves all rows (megatron's
static context has one sequence offset for the whole batch, and its RoPE follows that offset,
not per-row position ids). A row shifted right by p pad positions still attends as it would
unpadded: RoPE scores depend only on the distance between query and key. What padding needs:

* a key-padding mask (True = masked out, megatron's convention, which our SDPA core attention
  takes as the whole mask): in the prefill causal & not-a-pad-key, and each pad query sees
  itself, so no softmax row is empty (an all-masked row is NaN, and 0 * NaN poisons the real
  rows through the values); in a decode step, the row's pad keys;
* position ids counted from each row's first real token (they reach learned position
  embeddings; RoPE models ignore them).

Each row stops at its own stop id or after ``max_new_tokens``. Finished rows leave the batch
(:meth:`KVCache.keep_rows`), so later steps cost what the remaining rows cost. Every rank of a
model-parallel group runs the same loop; the last stage samples and broadcasts, as in
:func:`post_training.generate.generate`.
"""
from __future__ import annotations

import torch

from post_training.config import GenerateConfig
from post_training.generate import sample, sequence_budget
from post_training.inference.kv_cache import KVCache
from post_training.runtime import cpu_compat
from post_training.runtime.collectives import broadcast_from_last_stage

__all__ = ["generate_batch", "padding_masks"]


def padding_masks(pads: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a left-padded prefill of ``length`` tokens with ``pads`` [b] pad positions per row:
    the attention mask [b, 1, length, length] (True = masked out) and position ids [b, length]."""
    pos = torch.arange(length, device=pads.device)
    real_key = pos.unsqueeze(0) >= pads.unsqueeze(1)  # [b, k]
    causal = pos.unsqueeze(1) >= pos.unsqueeze(0)  # [q, k]
    allowed = (causal.unsqueeze(0) & real_key.unsqueeze(1)) | torch.eye(length, dtype=torch.bool,
                                                                          device=pads.device)
    return ~allowed.unsqueeze(1), (pos.unsqueeze(0) - pads.unsqueeze(1)).clamp(min=0)


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], cfg: GenerateConfig, seed: int = 1234,
                   max_seq_length: int | None = None, keys_rotated: bool | None = None) -> list[list[int]]:
    """Generate up to ``cfg.max_new_tokens`` tokens after each prompt, all rows together; a
    row stops at a stop id (included in its result). Sampling draws from one generator seeded
    with ``seed`` for the whole batch (rows get different draws). Greedy results equal
    per-prompt :func:`post_training.generate.generate` up to float rounding (padding shifts
    RoPE angles; exact ties aside, the same tokens). ``keys_rotated``: the cache's key format
    (:class:`KVCache`; default: the runtime's). The model must be in eval mode."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: every prompt needs at least one token")
    device = next(model.parameters()).device
    lens = [len(p) for p in prompts]
    length = max(lens)
    total = sequence_budget(length, cfg.max_new_tokens, max_seq_length, what="longest prompt")
    pads = torch.tensor([length - n for n in lens], device=device)
    # Pad with each row's own first token: any valid id works (its keys are masked out).
    tokens = torch.tensor([[p[0]] * (length - len(p)) + list(p) for p in prompts], device=device)
    mask, positions = padding_masks(pads, length) if bool(pads.any()) else (None, None)
    cache = KVCache(max_batch_size=len(prompts), max_sequence_length=total, keys_rotated=keys_rotated)
    gen = torch.Generator(device=device).manual_seed(seed) if cfg.temperature > 0 else None
    stops = set(cfg.stop_token_ids)
    active = list(range(len(prompts)))  # original row of each cache row
    out: list[list[int]] = [[] for _ in prompts]
    # As in generate(): the cache is allocated on the CPU device without the rewriting mode.
    with cpu_compat.device_mode_suspended():
        for step in range(cfg.max_new_tokens):
            logits = cache.forward(model, tokens, attention_mask=mask, position_ids=positions)
            nxt = torch.empty(len(active), dtype=torch.long, device=device)
            if logits is not None:
                nxt = sample(logits[:, -1, :], cfg, gen)
            nxt = broadcast_from_last_stage(nxt)
            keep = []
            for j, tok in enumerate(nxt.tolist()):
                out[active[j]].append(tok)
                if tok not in stops:
                    keep.append(j)
            if not keep or step == cfg.max_new_tokens - 1:
                break
            if len(keep) < len(active):  # every rank drops the same rows (same tokens)
                cache.keep_rows(keep)
                active = [active[j] for j in keep]
                idx = torch.tensor(keep, device=device)
                nxt, pads = nxt.index_select(0, idx), pads.index_select(0, idx)
            tokens = nxt.view(-1, 1)
            if bool(pads.any()):
                keys = torch.arange(cache.length + 1, device=device)
                mask = (keys.unsqueeze(0) < pads.unsqueeze(1)).view(len(active), 1, 1, -1)
                positions = (cache.length - pads).view(-1, 1)
            else:  # no padded row left: the plain decode step
                mask = positions = None
    return out
