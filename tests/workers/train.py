"""Worker: a few training steps of a model at a given TP/PP on fixed random tokens.

Run under torchrun (or plain python for one rank). Global rank 0 writes the per-step losses,
grad norms and learning rates as json; every rank checks it got the same values.
"""
import argparse
import json

import torch
import torch.distributed as dist

from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.config import ModelConfig
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime
from post_training.config import BatchConfig, TrainConfig
from post_training.training import build_optimizer, microbatches, train_step


def fixed_batch(cfg: BatchConfig, seq_length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [gbs, s + 1] and a loss mask that drops a random ~25% of the labels
    (so token counts differ between microbatches and the token-level mean matters)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (cfg.global_batch_size, seq_length + 1), generator=g)
    mask = (torch.rand(tokens.shape, generator=g) > 0.25).long()
    return tokens, mask


def run(hf_dir: str, rt, steps: int = 4, lr: float = 1e-3, clip_grad: float = 1.0,
        micro_batch_size: int = 2, global_batch_size: int = 4, seq_length: int = 32) -> dict:
    """Build, train ``steps`` steps on one fixed batch; per-step loss, grad norm and lr.
    Also called in-process by tests/test_training.py (the TP=1 reference)."""
    cfg = TrainConfig(lr=lr, min_lr=lr / 10, lr_warmup_iters=0, train_iters=steps, clip_grad=clip_grad)
    bcfg = BatchConfig(micro_batch_size=micro_batch_size, global_batch_size=global_batch_size)
    model, _, hf_config = setup_model(SourceConfig(pretrained_model_path=hf_dir),
                                      ModelConfig(seq_length=seq_length), rt, inference=False)
    model, optimizer, scheduler = build_optimizer(model, cfg, bcfg, seed=1234)
    tokens, mask = fixed_batch(bcfg, seq_length, hf_config.vocab_size, seed=7)
    batches = microbatches(tokens, bcfg, rt, loss_mask=mask)
    results = [train_step(model, optimizer, scheduler, batches, bcfg) for _ in range(cfg.train_iters)]
    return {"loss": [r.loss for r in results], "grad_norm": [r.grad_norm for r in results],
            "lr": [r.lr for r in results]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    out = run(a.hf_dir, rt, steps=a.steps)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if any(g != out for g in gathered):
        raise AssertionError(f"ranks disagree: {gathered}")
    if dist.get_rank() == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    destroy_runtime()


if __name__ == "__main__":
    main()
