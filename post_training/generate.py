"""Autoregressive generation with megatron-core's static KV cache, correct at any TP/PP.

Every rank of a model-parallel group runs the same loop. With PP > 1 the activations
travel stage to stage by point-to-point sends; the last stage samples and broadcasts the
token to its pipeline group, so every rank returns the same tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext

from post_training.runtime import cpu_compat
from post_training.utils import UsageError


@dataclass(kw_only=True)
class GenerateConfig:
    """Sampling settings. Flags: --max-new-tokens, --temperature, --top-p, --top-k."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 1234
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (got {self.top_k})")


def _stage_io(model) -> tuple[bool, bool]:
    return model.pre_process, model.post_process


def forward_step(model, tokens: torch.Tensor, ctx: StaticInferenceContext | None) -> torch.Tensor | None:
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


def _broadcast_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return t


@torch.inference_mode()
def generate(model, prompt_ids: list[int], cfg: GenerateConfig, max_seq_length: int | None = None) -> list[int]:
    """Generate up to ``cfg.max_new_tokens`` tokens after ``prompt_ids``; stops at a stop id
    (included in the result). The model must be in eval mode."""
    device = next(model.parameters()).device
    total = len(prompt_ids) + cfg.max_new_tokens
    if max_seq_length is not None and total > max_seq_length:
        raise UsageError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({cfg.max_new_tokens}) exceeds "
            f"--seq-length {max_seq_length}"
        )
    ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=total)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    stops = set(cfg.stop_token_ids)
    # The prefill allocates the KV cache on torch.cuda.current_device(), which the shim answers
    # with the CPU device itself, so the whole loop runs without the device-rewriting mode.
    with cpu_compat.device_mode_suspended():
        for _ in range(cfg.max_new_tokens):
            logits = forward_step(model, tokens, ctx)
            ctx.increment_sequence_len_offset(tokens.size(1))
            nxt = torch.empty(1, dtype=torch.long, device=device)
            if logits is not None:
                nxt = sample(logits[:, -1, :], cfg, gen)
            nxt = _broadcast_from_last_stage(nxt)
            tok = int(nxt.item())
            out.append(tok)
            if tok in stops:
                break
            tokens = nxt.view(1, 1)
    return out
