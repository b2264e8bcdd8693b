"""The training loop on a stand-in data source: random token ids from a small range (so a tiny
model learns them within a few steps), one global batch per step drawn from a generator seeded
by the step number, so the stream is a function of the consumed samples, as a resumed run needs.

``run`` is called in-process by tests/test_train_loop.py (the TP=1 reference) and by
tests/workers/multi.py (--loop) at TP=2 / PP=2 / DP=2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from post_training.config import (BatchConfig, LoopConfig, ModelConfig, SaveConfig, SourceConfig,
                                  TrainConfig)
from post_training.model_builder import setup_model
from post_training.train_loop import TrainData, run_training
from post_training.training import microbatches

VOCAB_RANGE = 64  # token ids drawn from [0, 64): the loss falls fast from ~ln(49152)


def token_data(bcfg: BatchConfig, rt, seq_length: int, seed: int = 100, valid: bool = True,
               poison: tuple | None = None) -> TrainData:
    """``poison=(step, model)``: before drawing that step's batch, set a norm weight of the model
    to nan (the way a diverging run ends up), to test the non-finite stop."""
    gbs = bcfg.global_size(rt.dp)

    def stream(first_step: int, base: int):
        step = first_step
        while True:
            if poison is not None and step + 1 == poison[0]:
                with torch.no_grad():
                    next(p for n, p in poison[1].named_parameters() if "layernorm" in n).fill_(float("nan"))
            g = torch.Generator().manual_seed(base + step)
            tokens = torch.randint(0, VOCAB_RANGE, (gbs, seq_length + 1), generator=g)
            mask = (torch.rand(tokens.shape, generator=g) > 0.2).long()  # uneven token counts
            yield microbatches(tokens, bcfg, rt, loss_mask=mask)
            step += 1

    return TrainData(train=lambda consumed: stream(consumed // gbs, seed),
                     valid=(lambda: stream(0, seed + 10_000)) if valid else None)


def run(hf_dir: str, rt, *, iters: int = 6, load: str | None = None, save: str | None = None,
        save_interval: int = 0, log_file: str | None = None, lr: float = 2e-3, dropout: float = 0.0,
        eval_interval: int = 0, micro_batch_size: int = 2, global_batch_size: int = 4, seq_length: int = 16,
        finetune: bool = False, no_load_optim: bool = False, no_load_rng: bool = False, poison_at: int | None = None,
        plot: bool = False, model=None, schedule: str | None = None) -> dict:
    """Build (or take) the model, run the loop; per-iteration losses of every term, the lrs,
    grad norms and the validation records."""
    tcfg = TrainConfig(lr=lr, min_lr=lr / 10, lr_warmup_iters=1, train_iters=iters, lr_decay_style="cosine",
                       override_opt_param_scheduler=schedule == "override",
                       use_checkpoint_opt_param_scheduler=schedule == "checkpoint")
    bcfg = BatchConfig(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size)
    lcfg = LoopConfig(log_interval=1, eval_interval=eval_interval, eval_iters=2, save_interval=save_interval,
                      log_file=log_file, plot=plot, finetune=finetune, no_load_optim=no_load_optim,
                      no_load_rng=no_load_rng, progress=False)
    if model is None:
        model, _, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir, load=load),
                                  ModelConfig(seq_length=seq_length, hidden_dropout=dropout), rt, inference=False)
    data = token_data(bcfg, rt, seq_length, poison=(poison_at, model) if poison_at else None)
    res = run_training(model, rt, data, train=tcfg, batch=bcfg, loop=lcfg, save=SaveConfig(save=save),
                       load=load, hf_dir=Path(hf_dir))
    train = [r for r in res.records if r["kind"] == "train"]
    return {"iteration": [r["iteration"] for r in train], "loss": [r["losses"]["lm loss"] for r in train],
            "lr": [r["lr"] for r in train], "grad_norm": [r["grad_norm"] for r in train],
            "valid": [(r["iteration"], r["losses"]["lm loss"]) for r in res.records if r["kind"] == "valid"],
            "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None,
            "plot": str(res.plot) if res.plot else None}
