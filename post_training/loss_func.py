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

Distillation (the model is ModelOpt's ``DistillationModel``, see
:mod:`post_training.distillation`): the KD terms come from the model's ``compute_kd_loss``,
each masked and summed like the LM loss (:func:`kd_term_sum`), and are reported under
Megatron-LM's names: ``lm loss``, ``logits distillation loss``, ``intermediate distillation
loss`` (when layer pairs are set), ``total loss`` (the optimized one).

Draft heads (:mod:`post_training.speculative.heads`): the model returns ModelOpt's per-token
draft loss, reported as ``lm loss`` as Megatron-LM does; each train-time-test step
(``eagle ttt-<i> loss``, and ``eagle ttt-<i> acc``: the share of positions where the draft's top
token is the target's) or Medusa head (``medusa head-<i> loss``) is reported beside it.
"""
from __future__ import annotations

from functools import partial
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

    ``model`` (possibly DDP-wrapped): when it is a ModelOpt ``DistillationModel`` the KD terms
    are added as Megatron-LM's post_training ``loss_func`` does; in training the optimized loss
    is the balancer's total, in evaluation the LM loss."""
    lm_loss = masked_token_loss(output_tensor, loss_mask)
    num_tokens = loss_mask.sum().detach().to(torch.int)
    report: LossReport = {"lm loss": _pair(lm_loss, num_tokens)}
    loss = lm_loss
    kd_model = _distillation_model(model)
    if kd_model is not None:
        terms = kd_model.compute_kd_loss(student_loss=lm_loss,
                                         loss_reduction_fn=partial(kd_term_sum, loss_mask=loss_mask))
        report["logits distillation loss"] = _pair(terms["logits_loss"], num_tokens)
        if len(kd_model._layers_to_loss) > 1:  # logits + intermediate pairs
            report["intermediate distillation loss"] = _pair(terms["intermediate_loss"], num_tokens)
        report["total loss"] = _pair(terms["kd_loss"], num_tokens)
        if kd_model.training:
            loss = terms["kd_loss"]
    for name, per_token, start in _draft_terms(model):
        # draft heads (speculative/heads.py): the optimized loss is the plugin's sum ("lm loss");
        # each TTT step / Medusa head is reported on the positions it covers
        mask = loss_mask.clone()
        mask[:, :start] = 0
        report[name] = _pair(masked_token_loss(per_token, mask), mask.sum())
    return loss, num_tokens, report


def _draft_terms(model: Any) -> list:
    while hasattr(model, "module"):
        model = model.module
    return [t for t in getattr(model, "_pt_draft_terms", None) or [] if t is not None]


def _distillation_model(model: Any) -> Any:
    while hasattr(model, "module"):  # DDP / Float16Module
        model = model.module
    return model if model is not None and hasattr(model, "compute_kd_loss") else None


def kd_term_sum(term: Any, loss_mask: torch.Tensor) -> torch.Tensor:
    """Masked sum of one ModelOpt megatron KD loss: ``([b, s] per-token loss, tp_reduce,
    sequence_parallel)``. ``tp_reduce``: each TP rank holds the part of the loss from its vocab
    shard (vocab-parallel KL); the value is summed over TP while each rank's gradient stays
    that of its own part, since the softmax denominators inside the loss are already
    all-reduced with autograd (the same split Megatron-LM's ``_mask_loss`` makes)."""
    tp_reduce, sequence_parallel = False, False
    if isinstance(term, tuple):
        term, tp_reduce, sequence_parallel = term
    if sequence_parallel or tp_reduce:
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        if sequence_parallel:  # the [b, s] loss covers this rank's sequence chunk only
            idx, n = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
            loss_mask = torch.tensor_split(loss_mask, n, dim=1)[idx]
    total = masked_token_loss(term, loss_mask)
    if (sequence_parallel or tp_reduce) and dist.get_world_size(group) > 1:
        summed = total.detach().clone()
        dist.all_reduce(summed, group=group)
        total = total + (summed - total.detach())
    return total


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
