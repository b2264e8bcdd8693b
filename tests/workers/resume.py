"""Worker: train with a checkpoint in the middle, to compare against an uninterrupted run.

  resume.py full   --steps N                      train N steps
  resume.py first  --steps K --ckpt D             train K steps, save a training checkpoint
  resume.py full+first --steps K --full-steps N --ckpt D --full-out F
                                                  both in one process (one launch fewer): the
                                                  second run starts from the same seeds
  resume.py resume --steps N --ckpt D             load D (weights, optimizer, scheduler, RNG,
                                                  counters), train up to step N
Each step draws its own batch (seeded by the step number) and dropout is on, so the data
position and every RNG stream matter. Rank 0 writes {"step": loss} as json.
"""
import argparse
import json

import torch
import torch.distributed as dist

from post_training.checkpointing import load_training_state, save_checkpoint
from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.config import ModelConfig
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime
from post_training.config import BatchConfig, TrainConfig
from post_training.training import build_optimizer, microbatches, train_step


def batch(cfg: BatchConfig, seq_length: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 49152, (cfg.global_batch_size, seq_length + 1), generator=g)


def run(mode: str, a, rt, steps: int, out: str) -> None:
    tcfg = TrainConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=2, train_iters=6, lr_decay_style="cosine")
    cfg = BatchConfig(micro_batch_size=2, global_batch_size=4)
    mcfg = ModelConfig(seq_length=16, hidden_dropout=0.1, attention_dropout=0.1)
    src = SourceConfig(pretrained_model_path=a.hf_dir, load=a.ckpt if mode == "resume" else None)
    model, _, _ = setup_model(src, mcfg, rt, inference=False)
    model, optimizer, scheduler = build_optimizer(model, tcfg, cfg, seed=1234)
    start = 0
    if mode == "resume":
        state = load_training_state(a.ckpt, model, rt, optimizer, scheduler)
        start = state["iteration"]
        assert state["consumed_samples"] == start * cfg.global_batch_size
    losses = {}
    for step in range(start, steps):
        losses[step] = train_step(model, optimizer, scheduler, microbatches(batch(cfg, mcfg.seq_length, step), cfg, rt), cfg).loss
    if mode == "first":
        save_checkpoint(model, rt, a.ckpt, steps, hf_dir=a.hf_dir, optimizer=optimizer, scheduler=scheduler,
                        train_state={"iteration": steps, "consumed_samples": steps * cfg.global_batch_size})
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(losses, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["full", "first", "resume", "full+first"])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--full-steps", type=int)
    p.add_argument("--full-out")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    if a.mode == "full+first":
        run("full", a, rt, a.full_steps, a.full_out)
        run("first", a, rt, a.steps, a.out)
    else:
        run(a.mode, a, rt, a.steps, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
