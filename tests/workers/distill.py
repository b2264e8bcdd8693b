"""Worker part: a few distillation steps (student + teacher at this rank's TP/PP) on a fixed
batch. Called by tests/workers/multi.py (``--distill``) and in-process by
tests/test_distillation.py (the TP=1 reference)."""
import dataclasses

from megatron.core import parallel_state as ps

from post_training.config import BatchConfig, DistillConfig, ModelConfig, SourceConfig, TrainConfig
from post_training.distillation import setup_distillation
from post_training.model_builder import setup_model
from post_training.runtime.dist import seed_everything
from post_training.training import build_optimizer, microbatches, train_step

try:  # run as a sibling of multi.py (torchrun puts tests/workers on the path) or as workers.distill
    from train import fixed_batch
except ImportError:
    from workers.train import fixed_batch


def run(hf_dir: str, teacher: str, rt, kd_cfg: str | None = None, steps: int = 3, lr: float = 1e-2,
        load: str | None = None, seq_length: int = 32, global_batch_size: int = 4,
        truncate_vocab: bool = False) -> dict:
    """Per-step loss terms (Megatron's names) and grad norms; the trained model, its optimizer,
    schedule, batches and PP hook for more steps."""
    src = SourceConfig(pretrained_model_path=hf_dir, load=load)
    mcfg = ModelConfig(seq_length=seq_length)
    bcfg = BatchConfig(micro_batch_size=2, global_batch_size=global_batch_size)
    cfg = TrainConfig(lr=lr, min_lr=lr, lr_warmup_iters=0, train_iters=steps, clip_grad=1.0)
    model, tok, hf = setup_model(src, mcfg, rt, inference=False)
    model, adjust = setup_distillation(model, DistillConfig(teacher_load=teacher, kd_cfg=kd_cfg, truncate_vocab=truncate_vocab), src, mcfg, rt, tok)
    model, optimizer, scheduler = build_optimizer(model, cfg, bcfg, seed=1234)
    tokens, mask = fixed_batch(bcfg, seq_length, hf.vocab_size, seed=7)
    batches = microbatches(tokens, bcfg, rt, loss_mask=mask)
    results = [train_step(model, optimizer, scheduler, batches, bcfg, adjust) for _ in range(steps)]
    return {"losses": [r.losses for r in results], "grad_norm": [r.grad_norm for r in results],
            "model": model, "optimizer": optimizer, "scheduler": scheduler, "batches": batches,
            "batch": bcfg, "adjust": adjust}


def relayout(rt, tp: int, pp: int):
    """Re-initialise megatron-core's parallel state at another TP/PP over the same ranks (the
    rest of the world becomes DP), so a launch can also check a DP layout."""
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(1234)
    return dataclasses.replace(rt, tp=tp, pp=pp, dp=rt.world_size // (tp * pp))
