"""Loss functions in the shape megatron-core's ``forward_backward_func`` expects.

``forward_step_func(data_iterator, model)`` returns ``(output_tensor, partial(loss_func,
loss_mask))``; on the last pipeline stage the schedule calls the partial with the model's
output, here the per-token cross entropy ``[b, s]`` that ``GPTModel`` returns when given
``labels`` (vocab-parallel, so it is already the full-vocabulary loss on every TP rank).

``loss_func`` returns the 3-tuple ``(loss, num_tokens, report)``. The training loop sets
``config.calculate_per_token_loss = True``: the schedule then back-propagates the *summed*
loss of each microbatch and ``finalize_model_grads`` divides the gradients by the number of
loss tokens of the whole global batch (all microbatches, all DP ranks). That is the gradient
of the token-level mean, independent of how the batch is split into microbatches or ranks.
Reports carry ``[sum, count]`` pairs for the same reason; :func:`reduce_report` turns them
into means.

Distillation adds its KL term in :func:`loss_func` (see the marked place); the LM part and
the report format stay as they are.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

LossReport = dict[str, torch.Tensor]


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum (fp32) of the per-token losses where ``loss_mask`` is set; a 0-dim tensor."""
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    if losses.numel() != mask.numel():
        raise ValueError(f"loss [{per_token_loss.shape}] and loss mask [{loss_mask.shape}] differ in size")
    return torch.sum(losses * mask)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor,
              model: Any = None) -> tuple[torch.Tensor, torch.Tensor, LossReport]:
    """megatron-core loss contract: (summed loss, number of loss tokens, report).

    ``model`` is unused by the LM loss; it is where the distillation loss will find the
    ModelOpt ``DistillationModel`` (as Megatron-LM's post_training ``loss_func`` does)."""
    lm_loss = masked_token_loss(output_tensor, loss_mask)
    num_tokens = loss_mask.sum().detach().to(torch.int)
    report: LossReport = {"lm loss": _pair(lm_loss, num_tokens)}
    loss = lm_loss
    # Distillation: when `model` is a DistillationModel, add its (summed, token-level) KL
    # term to `loss` here and report it as another [sum, count] pair, e.g. "kd loss".
    return loss, num_tokens, report


def _pair(loss_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    return torch.stack([loss_sum.detach().double(), num_tokens.double()])


def reduce_report(reports: list[LossReport], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Token-level means of per-microbatch ``[sum, count]`` reports, summed over ``group``
    (the data-parallel group) so every DP rank gets the global-batch mean."""
    out: dict[str, float] = {}
    for key in (reports[0].keys() if reports else ()):
        total = torch.stack([r[key].reshape(2) for r in reports]).sum(dim=0)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        out[key] = float(total[0] / total[1].clamp(min=1))
    return out
