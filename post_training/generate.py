"""Autoregressive generation with the KV cache (:class:`post_training.inference.KVCache`),
correct at any TP/PP.

Every rank of a model-parallel group runs the same loop. With PP > 1 the activations
travel stage to stage by point-to-point sends (:func:`stage_forward`); the last stage samples
and broadcasts the token to its pipeline group, so every rank returns the same tokens.
"""
from __future__ import annotations

import torch

from post_training.config import GenerateConfig
from post_training.inference import KVCache
from post_training.runtime import cpu_compat
from post_training.runtime.collectives import broadcast_from_last_stage
from post_training.utils import UsageError

__all__ = ["generate", "sample", "sampling_probs", "sequence_budget", "stop_token_ids"]


def sampling_probs(logits: torch.Tensor, cfg: GenerateConfig) -> torch.Tensor:
    """logits [..., V] -> the distribution sampling draws from: temperature, then top-k, then
    top-p (fp32). Speculative sampling verifies drafts against exactly this distribution."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits.softmax(-1)


def sample(logits: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> token ids [b]. Greedy at temperature 0, else top-k / top-p sampling."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, cfg), 1, generator=gen).squeeze(-1)


def sequence_budget(prompt_len: int, max_new_tokens: int, max_seq_length: int | None,
                    what: str = "prompt") -> int:
    """Positions a KV cache needs for ``prompt_len`` + ``max_new_tokens``; more than
    ``--seq-length`` (when given) is a usage error."""
    total = prompt_len + max_new_tokens
    if max_seq_length is not None and total > max_seq_length:
        raise UsageError(f"{what} ({prompt_len} tokens) + --max-new-tokens ({max_new_tokens}) exceeds "
                         f"--seq-length {max_seq_length}")
    return total


@torch.inference_mode()
def generate(model, prompt_ids: list[int], cfg: GenerateConfig, max_seq_length: int | None = None,
             seed: int = 1234) -> list[int]:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``prompt_ids``; stops at a stop id
    (included in the result). Sampling draws from a generator seeded with ``seed`` (the run's,
    ParallelConfig.seed). The model must be in eval mode."""
    device = next(model.parameters()).device
    total = sequence_budget(len(prompt_ids), cfg.max_new_tokens, max_seq_length)
    cache = KVCache(max_batch_size=1, max_sequence_length=total)
    gen = torch.Generator(device=device).manual_seed(seed) if cfg.temperature > 0 else None
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    stops = set(cfg.stop_token_ids)
    # The prefill allocates the KV cache on torch.cuda.current_device(), which the shim answers
    # with the CPU device itself, so the whole loop runs without the device-rewriting mode.
    with cpu_compat.device_mode_suspended():
        for _ in range(cfg.max_new_tokens):
            logits = cache.forward(model, tokens)
            nxt = torch.empty(1, dtype=torch.long, device=device)
            if logits is not None:
                nxt = sample(logits[:, -1, :], cfg, gen)
            nxt = broadcast_from_last_stage(nxt)
            tok = int(nxt.item())
            out.append(tok)
            if tok in stops:
                break
            tokens = nxt.view(1, 1)
    return out


def stop_token_ids(tokenizer, hf_config) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS and the model config's."""
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)):
        ids.update(src if isinstance(src, list) else [src] if src is not None else [])
    return sorted(ids)
