"""A Megatron training step: megatron-core DDP, optimizer, LR schedule and pipeline schedule.

Nothing here re-implements megatron-core: the model is wrapped in its
``DistributedDataParallel``, the optimizer comes from ``get_megatron_optimizer`` and the
learning rate from ``OptimizerParamScheduler``; forward and backward run through
``get_forward_backward_func()``, so the same step works at TP > 1, PP > 1 (microbatches
pipelined 1F1B) and DP > 1, on CPU over gloo and on GPU over nccl. The loss is the
token-level mean of :mod:`post_training.loss_func`.

Usage::

    model, _, _ = setup_model(src, mcfg, rt, inference=False)
    model, optimizer, scheduler = build_optimizer(model, cfg)
    for it in range(cfg.train_iters):
        mbs = microbatches(global_tokens, cfg, rt)           # this DP rank's microbatches
        result = train_step(model, optimizer, scheduler, mbs, cfg)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, NamedTuple

import torch
import torch.distributed as dist
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

from post_training.loss_func import loss_func, reduce_report
from post_training.runtime import Runtime
from post_training.runtime.dist import seed_everything
from post_training.utils import UsageError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
Microbatch = dict[str, torch.Tensor]


@dataclass(kw_only=True)
class TrainConfig:
    """Optimizer, schedule and batch settings. Megatron flags of the same names:
    --lr, --min-lr, --lr-warmup-iters, --lr-decay-iters, --lr-decay-style, --weight-decay,
    --clip-grad, --adam-beta1/2, --adam-eps, --micro-batch-size, --global-batch-size,
    --seq-length, --train-iters, --seed."""

    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01  # not applied to biases and 1-D params (norms), as in Megatron
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping (and the norm report)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 4096
    train_iters: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        checks = [
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr] (got {self.min_lr})"),
            (self.lr_decay_style in LR_DECAY_STYLES,
             f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)} (got {self.lr_decay_style!r})"),
            (self.train_iters >= 1, f"--train-iters must be >= 1 (got {self.train_iters})"),
            (self.lr_decay_iters >= 1, f"--lr-decay-iters must be >= 1 (got {self.lr_decay_iters})"),
            (0 <= self.lr_warmup_iters < self.lr_decay_iters,
             f"--lr-warmup-iters must be in [0, lr-decay-iters) (got {self.lr_warmup_iters})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.clip_grad >= 0, f"--clip-grad must be >= 0 (got {self.clip_grad})"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"--adam-beta1/2 must be in [0, 1) (got {self.adam_beta1}, {self.adam_beta2})"),
            (self.adam_eps > 0, f"--adam-eps must be > 0 (got {self.adam_eps})"),
            (self.micro_batch_size >= 1, f"--micro-batch-size must be >= 1 (got {self.micro_batch_size})"),
            (self.global_batch_size % max(self.micro_batch_size, 1) == 0 and self.global_batch_size >= 1,
             f"--global-batch-size ({self.global_batch_size}) must be a positive multiple of "
             f"--micro-batch-size ({self.micro_batch_size})"),
            (self.seq_length >= 1, f"--seq-length must be >= 1 (got {self.seq_length})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)

    def num_microbatches(self, dp: int) -> int:
        """Microbatches per DP rank per step (Megatron: gbs / (mbs * dp))."""
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise UsageError(
                f"--global-batch-size ({self.global_batch_size}) must be divisible by "
                f"--micro-batch-size * DP ({self.micro_batch_size} * {dp})"
            )
        return self.global_batch_size // (self.micro_batch_size * dp)


class StepResult(NamedTuple):
    """What one step reports; identical on every rank."""

    loss: float  # token-level mean LM loss of the global batch, before the update
    grad_norm: float | None  # global norm before clipping; None when clip_grad == 0
    lr: float  # learning rate used by this step's update
    skipped: bool = False  # fp16 loss-scale overflow: no update, the schedule did not advance


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig
                    ) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """Put ``model`` (this rank's stage, from ``setup_model(..., inference=False)``) in train
    mode, wrap it in megatron-core DDP and build its optimizer and LR schedule.

    The model's TransformerConfig is wired the way Megatron-LM's ``setup_model_and_optimizer``
    does, since the pipeline schedules read their hooks from it: per-token loss scaling
    (see loss_func), ``finalize_model_grads`` (DP all-reduce, tied-embedding grads across PP
    stages, division by the token count) and the optimizer's loss scale."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("the model has no trainable parameters (load it with inference=False)")
    seed_everything(cfg.seed)  # dropout and other RNG use in training starts from cfg.seed
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
    gbs = cfg.global_batch_size  # Megatron's iteration-based schedule counts samples
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
    )
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return ddp_model, optimizer, scheduler


def microbatches(tokens: torch.Tensor, cfg: TrainConfig, rt: Runtime,
                 loss_mask: torch.Tensor | None = None) -> list[Microbatch]:
    """Split a global batch of token ids ``[global_batch_size, seq_length + 1]`` into this DP
    rank's microbatches: inputs are ``tokens[:, :-1]``, labels ``tokens[:, 1:]``;
    ``loss_mask`` (same shape as ``tokens``, 1 = predict this token) masks the labels.
    Every rank of a model-parallel group gets the same microbatches."""
    gbs, s1 = tokens.shape
    if gbs != cfg.global_batch_size or s1 != cfg.seq_length + 1:
        raise UsageError(f"batch {tuple(tokens.shape)} != (global_batch_size, seq_length + 1) = "
                         f"({cfg.global_batch_size}, {cfg.seq_length + 1})")
    n = cfg.num_microbatches(rt.dp)
    dp_rank = ps.get_data_parallel_rank()
    per_rank = gbs // rt.dp
    mask = torch.ones_like(tokens) if loss_mask is None else loss_mask
    tokens = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(rt.device)
    mask = mask[dp_rank * per_rank:(dp_rank + 1) * per_rank].to(rt.device)
    positions = torch.arange(cfg.seq_length, device=rt.device).unsqueeze(0)
    out = []
    for i in range(n):
        sl = slice(i * cfg.micro_batch_size, (i + 1) * cfg.micro_batch_size)
        chunk = tokens[sl]
        out.append({
            "tokens": chunk[:, :-1].contiguous(),
            "labels": chunk[:, 1:].contiguous(),
            "loss_mask": mask[sl, 1:].float().contiguous(),
            "position_ids": positions.expand(chunk.size(0), -1),
        })
    return out


def forward_step(data_iterator: Iterator[Microbatch], model: torch.nn.Module
                 ) -> tuple[torch.Tensor, Any]:
    """megatron-core ``forward_step_func``: this stage's output and the loss function.

    Every stage draws the same microbatch; the first uses the tokens, the last the labels
    and loss mask. With labels the last stage returns per-token losses, not logits, so the
    vocab-sized logits never leave the vocab-parallel cross entropy."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"], model=model)


def train_step(model: DistributedDataParallel, optimizer: MegatronOptimizer,
               scheduler: OptimizerParamScheduler, batches: list[Microbatch],
               cfg: TrainConfig) -> StepResult:
    """One optimizer step on this DP rank's microbatches (from :func:`microbatches`)."""
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
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        forward_only=False,
    )
    lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else cfg.lr
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:  # as Megatron-LM: a skipped (overflowed) step does not count
        scheduler.step(increment=cfg.global_batch_size)
    loss = _loss_on_every_rank(reports)
    return StepResult(loss=loss, grad_norm=None if grad_norm is None else float(grad_norm), lr=lr,
                      skipped=not update_successful)


def _loss_on_every_rank(reports: list) -> float:
    """The last stage holds the reports; reduce them over DP and give the mean to all
    pipeline stages (TP ranks of the last stage already agree)."""
    # nccl collectives need device tensors, gloo CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        value[0] = reduce_report(reports, ps.get_data_parallel_group())["lm loss"]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(value, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return float(value[0])
