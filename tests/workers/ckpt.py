"""Worker: save a model as a dist checkpoint, or load one, at a given TP/PP; write logits.

  ckpt.py save --hf-dir D --save OUT [--iteration N] --tp T --pp P --out logits.pt
  ckpt.py load --load OUT --tp T --pp P --out logits.pt

The functions also serve tests/workers/multi.py (several tasks in one launch) and in-process
TP=1 loads in the tests.
"""
import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from post_training.checkpointing import save_checkpoint
from post_training.config import ModelConfig, SourceConfig
from post_training.hf import source_hf_dir
from post_training.inference import stage_forward
from post_training.model_builder import setup_model
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime

IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000
QUANTIZE = ("fp8", "fp8-kv", "int8")


def build(rt, hf_dir: str | None = None, load: str | None = None, quantize: str | None = None):
    """The model from an HF dir or a checkpoint, quantized (and calibrated on IDS) if asked."""
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir, load=load), ModelConfig(), rt)
    if quantize:
        import modelopt.torch.quantization as mtq

        base = {"fp8": mtq.FP8_DEFAULT_CFG, "int8": mtq.INT8_DEFAULT_CFG}.get(quantize, {"quant_cfg": None})
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(base, mtq.FP8_KV_CFG["quant_cfg"])
        model = mtq.quantize(model, cfg, lambda m: stage_forward(m, IDS, None))
    return model


def save(model, rt, root: str, iteration: int | None, hf_dir: str | None = None, keep_last: int | None = None):
    src = SourceConfig(pretrained_model_path=hf_dir)
    save_checkpoint(model, rt, root, iteration, hf_dir=source_hf_dir(src), keep_last=keep_last)


def outputs(model, rt) -> dict | None:
    """Logits on IDS (last stage, TP rank 0) and every stage's quantizer amax (gathered), on the
    rank that holds the logits; None elsewhere. Collective."""
    with torch.inference_mode():
        logits = stage_forward(model, IDS, None)
    amax = {n: m.amax.clone() for n, m in model.named_modules()
            if n.endswith("_quantizer") and getattr(m, "amax", None) is not None}
    box = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(box, amax)  # every stage's quantizers
    else:
        box = [amax]
    if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
        return {"logits": logits, "amax": box}
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("--hf-dir")
    p.add_argument("--load")
    p.add_argument("--save")
    p.add_argument("--iteration", type=int, default=None)
    p.add_argument("--keep-last", type=int, default=None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--quantize", choices=QUANTIZE, help="quantize (and calibrate) before saving")
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    model = build(rt, a.hf_dir, a.load, a.quantize)
    if a.mode == "save":
        save(model, rt, a.save, a.iteration, a.hf_dir, a.keep_last)
    if a.out:
        res = outputs(model, rt)
        if res is not None:
            torch.save(res, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
