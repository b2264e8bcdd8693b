"""Worker: train a tiny HF model for 2 steps with DeepSpeed ZeRO on CPU ranks, save the checkpoint.

  DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 deepspeed_zero.py --hf-dir D --stage S --save OUT --out ref.pt

``OUT`` gets the layout of a Hugging Face Trainer checkpoint: ``latest``, ``global_step2/``
and the model's config and tokenizer files; ``ref.pt`` the trained model's logits on ``IDS``.
"""
import argparse
import importlib
import shutil
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM

IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    # The shared-memory allreduce is a speed-up that DeepSpeed JIT-compiles on first use (a C++
    # toolchain and ~1 min); gloo's allreduce does the same job for a test.
    # (``deepspeed.comm.torch`` as an attribute is the torch module that deepspeed.comm re-exports.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": a.stage}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for _ in range(2):
        engine.backward(engine(input_ids=IDS, labels=IDS).loss)
        engine.step()
    engine.save_checkpoint(a.save)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=a.stage == 3), torch.no_grad():
        logits = model(input_ids=IDS).logits
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits}, a.out)
        for f in Path(a.hf_dir).iterdir():  # what HF Trainer writes beside global_stepN/
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copy2(f, Path(a.save) / f.name)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
