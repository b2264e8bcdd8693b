"""The one training loop: SFT, QAT / QAD (a quantized model), distillation (a ModelOpt
DistillationModel) and draft heads differ by the model and its loss, not by the loop.

Around :func:`post_training.training.train_step` it does what Megatron-LM's ``train()`` does:
evaluation every ``--eval-interval`` (forward only, through the same pipeline schedule), a
checkpoint every ``--save-interval`` and at the end, exact resume from ``--load`` (optimizer,
LR schedule, RNG, data position), ``--no-load-optim`` / ``--no-load-rng`` / ``--finetune``,
a log line every ``--log-interval`` with each reported loss term by name, a jsonl record, a
progress bar and the loss-curve PNG. A non-finite loss stops the run before anything is saved.

Usage::

    model, tok, _ = setup_model(src, mcfg, rt, inference=False)
    data = TrainData(train=lambda consumed: my_batches(consumed), valid=None)
    result = run_training(model, rt, data, train=tcfg, batch=bcfg, loop=lcfg, save=scfg, load=src.load)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from post_training.config import BatchConfig, EMBEDDED_MODEL, LoopConfig, SaveConfig, TrainConfig
from post_training.io import layout as cio
from post_training.runtime import Runtime, memory_report
from post_training.train_log import (TrainLog, format_eval_line, format_train_line, plot_acceptance_curve,
                                     plot_loss_curves, progress_bar)
from post_training.training import (Microbatch, StepResult, build_optimizer, forward_step,
                                    losses_on_every_rank, train_step)
from post_training.utils import UsageError, print_rank_0

Batches = Iterator[list[Microbatch]]  # each item: this DP rank's microbatches of one global batch


class NonFiniteLoss(UsageError):
    """A loss term (or the grad norm) became inf / nan: the run stops, nothing more is saved."""


@dataclass
class TrainData:
    """Where the batches come from. ``train(consumed_samples)`` starts the training stream at a
    sample position (deterministic: a resumed run continues exactly where the checkpoint was);
    ``valid()`` starts the validation stream from its beginning (each evaluation sees the same
    batches, so evaluations are comparable)."""

    train: Callable[[int], Batches]
    valid: Callable[[], Batches] | None = None

    @classmethod
    def from_splits(cls, train_split, valid_split, batch: BatchConfig, rt: Runtime) -> "TrainData":
        """Global batches of chat splits (:mod:`post_training.chat_data`), collated for this rank."""
        from post_training.chat_data import global_batches
        from post_training.training import collate

        gbs = batch.global_size(rt.dp)

        def batches(split, consumed: int) -> Batches:
            return (collate(samples, batch, rt) for samples in global_batches(split, gbs, consumed))

        return cls(train=lambda consumed: batches(train_split, consumed),
                   valid=(lambda: batches(valid_split, 0)) if valid_split is not None else None)


@dataclass
class LoopResult:
    iteration: int
    consumed_samples: int
    records: list[dict] = field(default_factory=list)  # every train / valid record, in order
    last_checkpoint: Path | None = None
    plot: Path | None = None
    acceptance_plot: Path | None = None

    def summary(self) -> str:
        """The run's last line: where it stopped and the last logged value of each term."""
        last = [r for r in self.records if r["kind"] == "train"]
        terms = " | ".join(f"{k}: {v:.4f}" for k, v in last[-1]["losses"].items()) if last else ""
        return f"trained to iteration {self.iteration} ({self.consumed_samples} samples) | {terms}"


def quantizer_summary(model) -> str | None:
    """QAT: a quantized --load trains with fake quantization in forward and backward, the scales
    (amax) fixed by the PTQ calibration (restored by setup_model; nothing recalibrates them)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    qs = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    if not qs:
        return None
    on = [m for m in qs if m.is_enabled]
    calibrating = sum(bool(getattr(m, "_if_calib", False)) for m in on)
    if calibrating:  # a half-finished calibration would move the scales while training
        raise UsageError(f"{calibrating} quantizers of the loaded model are still calibrating: "
                         f"load a checkpoint saved after calibration (scripts/quantize.sh)")
    return (f"QAT: {len(on)} of {len(qs)} quantizers enabled (fake quantization in training), "
            f"scales kept from calibration")


def apply_lora(model, rank: int, seed: int) -> str:
    """ModelOpt LoRA adapters (rank ``rank``, all linear layers but the output layer); only the
    adapters train. A --load that holds adapters already (a LoRA checkpoint) keeps them."""
    import modelopt.torch.peft as mtpeft
    from modelopt.torch.peft.convert import is_peft_model

    if not is_peft_model(model):
        torch.manual_seed(seed)  # lora_A of replicated layers: the same init on every TP rank
        mtpeft.update_model(model, {
            "adapter_type": "lora", "adapter_name": "default",
            "adapter_cfg": {"*": {"rank": rank, "scale": 1.0, "enable": True},
                            "*output_layer*": {"enable": False}}})
    n_train = n_all = 0
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        n_all += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    return f"LoRA rank {rank}: {n_train:,} trainable parameters of {n_all:,} (base weights frozen)"


def evaluate(model, batches: Batches, batch: BatchConfig, iters: int, adjust_tensor_shapes_fn=None
             ) -> dict[str, float]:
    """Token-level mean of every reported term over ``iters`` global batches, forward only
    through the pipeline schedule (the same loss function as training, dropout off)."""
    n = batch.num_microbatches(ps.get_data_parallel_world_size())
    reports: list = []
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(iters):
                mbs = next(batches)
                reports += get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(mbs), model=[model],
                    num_microbatches=n, seq_length=mbs[0]["tokens"].size(1),
                    micro_batch_size=batch.micro_batch_size, forward_only=True,
                    adjust_tensor_shapes_fn=adjust_tensor_shapes_fn)
    finally:
        model.train()
    return losses_on_every_rank(reports)  # the schedule's reports concatenate: sums of sums


def _first_non_finite(res: StepResult) -> tuple[str, float] | None:
    for name, value in (res.losses or {"loss": res.loss}).items():
        if not math.isfinite(value):
            return name, value
    # an fp16 overflow is skipped by the optimizer (no update); any other inf/nan norm is not
    if res.grad_norm is not None and not res.skipped and not math.isfinite(res.grad_norm):
        return "grad norm", res.grad_norm
    return None


def _resume(load: str | None, model, rt: Runtime, optimizer, scheduler, loop: LoopConfig
            ) -> tuple[int, int]:
    """(iteration, consumed samples) to start from, after restoring the training state of a
    ``--load`` checkpoint that has one. The weights were loaded by setup_model already."""
    from post_training.checkpointing.load import load_training_state, rng_state, set_rng_state
    from post_training.hf import load_kind

    if not load or load_kind(load) != "dist" or loop.finetune:
        return 0, 0
    iter_dir = cio.find_checkpoint(load)
    meta = cio.read_meta(iter_dir)
    if not meta.get("contents", {}).get("rng") or "iteration" not in meta.get("train_state", {}):
        # a PTQ / export checkpoint: weights (and ModelOpt state) only -- a new run on top of it
        print_rank_0(f"{iter_dir} holds no training state: training starts at iteration 0")
        return 0, 0
    kept = rng_state() if loop.no_load_rng else None
    try:
        state = load_training_state(iter_dir, model, rt, None if loop.no_load_optim else optimizer, scheduler)
    except UsageError:
        raise
    except Exception as e:  # missing / differently shaped optimizer tensors: a different model layout
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"cannot restore the optimizer state of {iter_dir} ({type(e).__name__}: {first}); "
                         f"its layout differs from this model's: pass --no-load-optim to start a fresh "
                         f"optimizer (or --finetune for the weights alone)") from None
    if kept is not None:
        set_rng_state(kept)
    it, consumed = int(state["iteration"]), int(state.get("consumed_samples", 0))
    print_rank_0(f"resuming from {iter_dir} at iteration {it} ({consumed} samples consumed)"
                 + (", fresh optimizer" if loop.no_load_optim else ""))
    return it, consumed


def run_training(model, rt: Runtime, data: TrainData, *, train: TrainConfig, batch: BatchConfig,
                 loop: LoopConfig, save: SaveConfig, load: str | None = None, seed: int = 1234,
                 hf_dir: Path | None = None, model_conf: str = EMBEDDED_MODEL,
                 adjust_tensor_shapes_fn=None, non_loss_data_func: Callable[[Any], dict] | None = None
                 ) -> LoopResult:
    """Train ``model`` (this rank's stage, trainable: ``setup_model(..., inference=False)``,
    wrapped for distillation / LoRA already) up to ``train.train_iters``. Collective.
    ``non_loss_data_func(model) -> record`` (collective, the model in train mode on return)
    runs every ``loop.eval_interval`` iterations and at the end; the loop adds the iteration
    and the consumed samples / tokens (sequence positions fed) to the record it logs."""
    dp = ps.get_data_parallel_world_size()
    gbs = batch.global_size(dp)
    batch.num_microbatches(dp)  # the divisibility error, before anything is built
    model, optimizer, scheduler = build_optimizer(model, train, batch, seed)
    it, consumed = _resume(load, model, rt, optimizer, scheduler, loop)
    if it >= train.train_iters:
        raise UsageError(f"--load is at iteration {it}, --train-iters is {train.train_iters}: nothing to train "
                         f"(raise --train-iters, or --finetune to start again from iteration 0)")
    stream = data.train(consumed)
    log = TrainLog(loop.log_file, start=it)
    result = LoopResult(it, consumed, log.records)
    saved_at = -1
    seq_len = 0  # positions per sample, from the batches (consumed tokens = consumed samples * seq_len)
    reported_at = -1

    def checkpoint() -> None:
        nonlocal saved_at
        from post_training.checkpointing import save_checkpoint

        result.last_checkpoint = save_checkpoint(
            model, rt, save.save, it, hf_dir=hf_dir, model_conf=model_conf, optimizer=optimizer,
            scheduler=scheduler, train_state={"iteration": it, "consumed_samples": consumed},
            keep_last=save.keep_last)
        saved_at = it

    def run_eval() -> None:
        losses = evaluate(model, data.valid(), batch, loop.eval_iters, adjust_tensor_shapes_fn)
        print_rank_0(format_eval_line(it, losses))
        log.add({"kind": "valid", "iteration": it, "consumed_samples": consumed, "losses": losses})

    def run_non_loss() -> None:
        nonlocal reported_at
        rec = non_loss_data_func(model)
        log.add({**rec, "iteration": it, "consumed_samples": consumed, "consumed_tokens": consumed * seq_len})
        reported_at = it

    bar = progress_bar(loop.progress, train.train_iters, it)
    window: list[StepResult] = []
    tokens = 0
    t_window = time.perf_counter()
    try:
        while it < train.train_iters:
            mbs = next(stream)
            res = train_step(model, optimizer, scheduler, mbs, batch, adjust_tensor_shapes_fn)
            it += 1
            consumed += gbs
            seq_len = mbs[0]["tokens"].size(1)
            tokens += gbs * seq_len
            bad = _first_non_finite(res)
            if bad is not None:
                where = (f"last checkpoint: {result.last_checkpoint}" if result.last_checkpoint
                         else "no checkpoint saved by this run")
                raise NonFiniteLoss(f"non-finite {bad[0]} ({bad[1]}) at iteration {it}: training stopped "
                                    f"without saving; {where}")
            window.append(res)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{'total loss' if 'total loss' in res.losses else 'lm loss'} {res.loss:.4f}")
            if it % loop.log_interval == 0 or it == train.train_iters:
                dt = time.perf_counter() - t_window
                names = list(window[-1].losses)
                rec = {"kind": "train", "iteration": it, "consumed_samples": consumed,
                       # Megatron averages each term over the iterations since the last log line
                       "losses": {n: sum(r.losses[n] for r in window) / len(window) for n in names},
                       "lr": res.lr, "grad_norm": res.grad_norm, "global_batch_size": gbs,
                       "skipped": sum(r.skipped for r in window),
                       "ms_per_iter": 1000 * dt / len(window), "tokens_per_s": tokens / dt,
                       "memory": "memory " + memory_report()}
                line = format_train_line(it, train.train_iters, rec)
                (bar.write(line) if bar is not None else print_rank_0(line))
                log.add(rec)
                window, tokens, t_window = [], 0, time.perf_counter()
            t_side = time.perf_counter()
            if data.valid is not None and loop.eval_interval and it % loop.eval_interval == 0:
                run_eval()
            if non_loss_data_func is not None and loop.eval_interval and it % loop.eval_interval == 0:
                run_non_loss()
            if save.save and loop.save_interval and it % loop.save_interval == 0:
                checkpoint()
            t_window += time.perf_counter() - t_side  # ms/iteration and tokens/s count training only
    finally:
        if bar is not None:
            bar.close()
        result.iteration, result.consumed_samples = it, consumed
    if data.valid is not None and loop.eval_interval and it % loop.eval_interval != 0:
        run_eval()  # Megatron also evaluates at the end of training
    if non_loss_data_func is not None and reported_at != it:
        run_non_loss()
    if save.save and saved_at != it:
        checkpoint()
    if loop.plot:
        where = Path(save.save) if save.save else (Path(loop.log_file).parent if loop.log_file else None)
        if where is not None:
            result.plot = plot_loss_curves(log.records, where / "loss_curves.png")
            if result.plot:
                print_rank_0(f"loss curves: {result.plot}")
            result.acceptance_plot = plot_acceptance_curve(log.records, where / "acceptance_curve.png")
            if result.acceptance_plot:
                print_rank_0(f"acceptance length vs training tokens: {result.acceptance_plot}")
    return result
