"""Autoregressive generation with megatron-core's static KV cache, correct at any TP/PP.

Every rank of a model-parallel group runs the same loop. With PP > 1 the activations
travel stage to stage by point-to-point sends; the last stage samples and broadcasts the
token to its pipeline group, so every rank returns the same tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext

from post_training.config import GenerateConfig
from post_training.runtime import cpu_compat
from post_training.runtime.collectives import broadcast_from_last_stage
from post_training.utils import UsageError


def _stage_io(model) -> tuple[bool, bool]:
    return model.pre_process, model.post_process


def stage_forward(model, tokens: torch.Tensor, ctx: StaticInferenceContext | None) -> torch.Tensor | None:
    """One forward of this rank's stage on ``tokens`` [b, s]. Returns full-vocab logits
    [b, s', V] on the last stage (s' = 1 when the cache materializes only the last token),
    None on other stages. Positions continue from the cache offset."""
    first, last = _stage_io(model)
    b, s = tokens.shape
    offset = ctx.sequence_len_offset if ctx is not None else 0
    positions = torch.arange(offset, offset + s, device=tokens.device).unsqueeze(0).expand(b, s)
    if not first:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype,
                             device=tokens.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def sample(logits: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] -> token ids [b]. Greedy at temperature 0, else top-k / top-p sampling."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate(model, prompt_ids: list[int], cfg: GenerateConfig, max_seq_length: int | None = None,
             seed: int = 1234) -> list[int]:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``prompt_ids``; stops at a stop id
    (included in the result). Sampling draws from a generator seeded with ``seed`` (the run's,
    ParallelConfig.seed). The model must be in eval mode."""
    device = next(model.parameters()).device
    total = len(prompt_ids) + cfg.max_new_tokens
    if max_seq_length is not None and total > max_seq_length:
        raise UsageError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({cfg.max_new_tokens}) exceeds "
            f"--seq-length {max_seq_length}"
        )
    ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=total)
    gen = torch.Generator(device=device).manual_seed(seed) if cfg.temperature > 0 else None
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    stops = set(cfg.stop_token_ids)
    # The prefill allocates the KV cache on torch.cuda.current_device(), which the shim answers
    # with the CPU device itself, so the whole loop runs without the device-rewriting mode.
    with cpu_compat.device_mode_suspended():
        for _ in range(cfg.max_new_tokens):
            logits = stage_forward(model, tokens, ctx)
            ctx.increment_sequence_len_offset(tokens.size(1))
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
