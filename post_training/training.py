"""A Megatron training step: megatron-core DDP, optimizer, LR schedule and pipeline schedule.

Nothing here re-implements megatron-core: the model is wrapped in its
``DistributedDataParallel``, the optimizer comes from ``get_megatron_optimizer`` and the
learning rate from ``OptimizerParamScheduler``; forward and backward run through
``get_forward_backward_func()``, so the same step works at TP > 1, PP > 1 (microbatches
pipelined 1F1B) and DP > 1, on CPU over gloo and on GPU over nccl. The loss is the
token-level mean of :mod:`post_training.loss_func`.

Usage::

    model, _, _ = setup_model(src, mcfg, rt, inference=False)
    model, optimizer, scheduler = build_optimizer(model, train, batch, seed)
    for it in range(train.train_iters):
        mbs = microbatches(global_tokens, batch, rt)         # this DP rank's microbatches
        result = train_step(model, optimizer, scheduler, mbs, batch)
"""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator, NamedTuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from post_training.chat_data import packed_attention_mask
from post_training.config import BatchConfig, TrainConfig
from post_training.loss_func import loss_func, reduce_report
from post_training.runtime import Runtime
from post_training.runtime.collectives import (
    broadcast_from_last_stage,
    broadcast_object_from_last_stage,
    comm_device,
)
from post_training.runtime.dist import seed_everything
from post_training.utils import UsageError

Microbatch = dict[str, torch.Tensor]


class StepResult(NamedTuple):
    """What one step reports; identical on every rank."""

    loss: float  # token-level mean of the optimized loss ("total loss", else "lm loss")
    grad_norm: float | None  # global norm before clipping; None when clip_grad == 0
    lr: float  # learning rate used by this step's update
    skipped: bool = False  # fp16 loss-scale overflow: no update, the schedule did not advance
    losses: dict[str, float] | None = None  # every reported term by name (Megatron's names)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, batch: BatchConfig, seed: int
                    ) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """Put ``model`` (this rank's stage, from ``setup_model(..., inference=False)``) in train
    mode, wrap it in megatron-core DDP and build its optimizer and LR schedule.

    The model's TransformerConfig is wired the way Megatron-LM's ``setup_model_and_optimizer``
    does, since the pipeline schedules read their hooks from it: per-token loss scaling
    (see loss_func), ``finalize_model_grads`` (DP all-reduce, tied-embedding grads across PP
    stages, division by the token count) and the optimizer's loss scale."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("the model has no trainable parameters (load it with inference=False)")
    seed_everything(seed)  # dropout and other RNG use in training starts from the run's seed
    model.train()
    config = get_model_config(model)
    config.calculate_per_token_loss = True  # read by DDP's constructor: set it first
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=False,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    gbs = batch.global_size(ps.get_data_parallel_world_size())  # Megatron's iteration-based schedule counts samples
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gbs,
        lr_decay_steps=cfg.lr_decay_iters * gbs,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.train_iters * gbs,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return ddp_model, optimizer, scheduler


def microbatches(tokens: torch.Tensor, cfg: BatchConfig, rt: Runtime,
                 loss_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 document_ids: torch.Tensor | None = None) -> list[Microbatch]:
    """Split a global batch of token ids ``[global_batch_size, seq_length + 1]`` into this DP
    rank's microbatches: inputs are ``tokens[:, :-1]``, labels ``tokens[:, 1:]``;
    ``loss_mask`` (same shape as ``tokens``, 1 = predict this token) masks the labels.
    Packed documents: ``position_ids`` ``[gbs, seq_length]`` (default 0..S-1) and
    ``document_ids`` ``[gbs, seq_length]``, which become each microbatch's block-diagonal
    ``attention_mask`` (built here, for this rank's samples only).
    Every rank of a model-parallel group gets the same microbatches."""
    gbs, s1 = tokens.shape
    if gbs != cfg.global_size(rt.dp) or s1 < 2:
        raise UsageError(f"batch {tuple(tokens.shape)} is not (global_batch_size = "
                         f"{cfg.global_size(rt.dp)}, seq_length + 1)")
    seq_length = s1 - 1
    n = cfg.num_microbatches(rt.dp)
    dp_rank = ps.get_data_parallel_rank()
    per_rank = gbs // rt.dp

    def mine(t: torch.Tensor) -> torch.Tensor:
        return t[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(rt.device)

    tokens = mine(tokens)
    mask = mine(torch.ones_like(tokens) if loss_mask is None else loss_mask)
    if position_ids is None:
        positions = torch.arange(seq_length, device=rt.device).expand(per_rank, -1)
    else:
        positions = mine(position_ids)
    docs = None if document_ids is None else mine(document_ids)
    out = []
    for i in range(n):
        sl = slice(i * cfg.micro_batch_size, (i + 1) * cfg.micro_batch_size)
        chunk = tokens[sl]
        mb = {
            "tokens": chunk[:, :-1].contiguous(),
            "labels": chunk[:, 1:].contiguous(),
            "loss_mask": mask[sl, 1:].float().contiguous(),
            "position_ids": positions[sl].contiguous(),
        }
        if docs is not None:
            mb["attention_mask"] = packed_attention_mask(docs[sl])
        out.append(mb)
    return out


def collate(samples: list[dict], cfg: BatchConfig, rt: Runtime) -> list[Microbatch]:
    """This DP rank's microbatches of one global batch of SFT samples
    (``chat_data.global_batches``): tokens, loss mask, position ids and, for packed documents
    with --reset-attention-mask, the attention mask."""
    def stack(key: str) -> torch.Tensor | None:
        return torch.stack([s[key] for s in samples]) if key in samples[0] else None

    return microbatches(stack("tokens"), cfg, rt, loss_mask=stack("loss_mask"),
                        position_ids=stack("position_ids"), document_ids=stack("document_ids"))


def forward_step(data_iterator: Iterator[Microbatch], model: torch.nn.Module
                 ) -> tuple[torch.Tensor, Any]:
    """megatron-core ``forward_step_func``: this stage's output and the loss function.

    Every stage draws the same microbatch; the first uses the tokens, the last the labels
    and loss mask. With labels the last stage returns per-token losses, not logits, so the
    vocab-sized logits never leave the vocab-parallel cross entropy."""
    batch = next(data_iterator)
    # attention_mask: [b, 1, s, s] bool, True = masked (Megatron's convention), for packed
    # documents that must not see each other; None = causal
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"], model=model)


def train_step(model: DistributedDataParallel, optimizer: MegatronOptimizer,
               scheduler: OptimizerParamScheduler, batches: list[Microbatch],
               cfg: BatchConfig, adjust_tensor_shapes_fn=None) -> StepResult:
    """One optimizer step on this DP rank's microbatches (from :func:`microbatches`).
    ``adjust_tensor_shapes_fn``: PP send/recv shapes when a stage sends more than its own
    activations (distillation: student and teacher together)."""
    n = cfg.num_microbatches(ps.get_data_parallel_world_size())
    if len(batches) != n:
        raise UsageError(f"train_step got {len(batches)} microbatches, expected {n}")
    model.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=n,
        seq_length=batches[0]["tokens"].size(1),
        micro_batch_size=cfg.micro_batch_size,
        forward_only=False,
        adjust_tensor_shapes_fn=adjust_tensor_shapes_fn,
    )
    lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else 0.0
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:  # as Megatron-LM: a skipped (overflowed) step does not count
        scheduler.step(increment=cfg.global_size(ps.get_data_parallel_world_size()))
    losses = losses_on_every_rank(reports)
    loss = losses.get("total loss", losses["lm loss"])
    return StepResult(loss=loss, grad_norm=None if grad_norm is None else float(grad_norm), lr=lr,
                      skipped=not update_successful, losses=losses)


def losses_on_every_rank(reports: list) -> dict[str, float]:
    """The last stage holds the reports; reduce them over DP and give the means to all
    pipeline stages (TP ranks of the last stage already agree). The report keys travel too,
    since only the last stage knows which terms the loss function reported."""
    names = sorted(reports[0]) if reports and ps.is_pipeline_last_stage(ignore_virtual=True) else []
    names = broadcast_object_from_last_stage(names)
    value = torch.zeros(len(names), dtype=torch.float64, device=comm_device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        means = reduce_report(reports, ps.get_data_parallel_group())
        value[:] = torch.tensor([means[n] for n in names], dtype=torch.float64)
    value = broadcast_from_last_stage(value)
    return {n: float(v) for n, v in zip(names, value)}
