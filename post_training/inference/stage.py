"""One forward of this rank's pipeline stage, with or without a KV cache, at any TP/PP."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext


def stage_forward(model, tokens: torch.Tensor, ctx: StaticInferenceContext | None,
                  attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """One forward of this rank's stage on ``tokens`` [b, s]. Returns full-vocab logits
    [b, s', V] on the last stage (s' = 1 when the cache materializes only the last token),
    None on other stages. Positions continue from the cache offset unless ``position_ids``
    [b, s] are given (they reach learned position embeddings; RoPE follows the cache offset).
    ``attention_mask`` [b, 1, s, keys] (True = masked out) replaces the causal mask. With
    PP > 1 the activations arrive from the previous stage and go to the next by
    point-to-point sends."""
    first, last = model.pre_process, model.post_process
    b, s = tokens.shape
    offset = ctx.sequence_len_offset if ctx is not None else 0
    positions = position_ids
    if positions is None:
        positions = torch.arange(offset, offset + s, device=tokens.device).unsqueeze(0).expand(b, s)
    if not first:
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype,
                             device=tokens.device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, attention_mask, inference_context=ctx, runtime_gather_output=True)
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out
