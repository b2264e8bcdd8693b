"""Worker: save a model as a dist checkpoint, or load one, at a given TP/PP; write logits.

  ckpt.py save --hf-dir D --save OUT [--iteration N] --tp T --pp P --out logits.pt
  ckpt.py load --load OUT --tp T --pp P --out logits.pt
"""
import argparse

import torch
from megatron.core import parallel_state as ps

from post_training.checkpointing import save_checkpoint
from post_training.config import SourceConfig
from post_training.hf import source_hf_dir
from post_training.model_builder import setup_model
from post_training.inference import stage_forward
from post_training.config import ModelConfig
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime

IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000


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
    p.add_argument("--quantize", choices=["fp8", "fp8-kv", "int8"], help="quantize (and calibrate) before saving")
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    src = SourceConfig(pretrained_model_path=a.hf_dir, load=a.load)
    model, _, _ = setup_model(src, ModelConfig(), rt)
    if a.quantize:
        import modelopt.torch.quantization as mtq

        base = {"fp8": mtq.FP8_DEFAULT_CFG, "int8": mtq.INT8_DEFAULT_CFG}.get(a.quantize, {"quant_cfg": None})
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(base, mtq.FP8_KV_CFG["quant_cfg"])
        model = mtq.quantize(model, cfg, lambda m: stage_forward(m, IDS, None))
    if a.mode == "save":
        save_checkpoint(model, rt, a.save, a.iteration, hf_dir=source_hf_dir(src), keep_last=a.keep_last)
    if a.out:
        with torch.inference_mode():
            logits = stage_forward(model, IDS, None)
        amax = {n: m.amax.clone() for n, m in model.named_modules()
                if n.endswith("_quantizer") and getattr(m, "amax", None) is not None}
        box = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(box, amax)  # every stage's quantizers
        if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
            torch.save({"logits": logits, "amax": box}, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
