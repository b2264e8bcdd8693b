"""Worker: apply ModelOpt LoRA to the toolkit model, train a few steps, save; or load; write logits.

  lora_train.py train --hf-dir D --save OUT --tp T --steps N --out logits.pt
  lora_train.py load --load OUT --tp T --out logits.pt

``train`` writes (on TP rank 0) the logits with the adapter active on a fixed input and the
largest |lora_B| seen on this rank (0 would mean the adapter never trained).
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
from post_training.quantization.ptq import next_token_loss
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime

IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000
LORA_CFG = {"adapter_type": "lora", "adapter_name": "default",
            "adapter_cfg": {"*": {"rank": 4, "scale": 2.0, "enable": True},
                            "*output_layer*": {"enable": False}}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "load"])
    p.add_argument("--hf-dir")
    p.add_argument("--load")
    p.add_argument("--save")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, device="cpu"))
    src = SourceConfig(pretrained_model_path=a.hf_dir, load=a.load)
    model, _, _ = setup_model(src, ModelConfig(), rt, inference=a.mode == "load")
    lora_b_max = 0.0
    if a.mode == "train":
        import modelopt.torch.peft as mtpeft

        torch.manual_seed(1234)  # lora_A init: the same on every rank (A of column layers is replicated)
        mtpeft.update_model(model, LORA_CFG)
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
        model.train()
        data = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
        for _ in range(a.steps):
            opt.zero_grad()
            next_token_loss(stage_forward(model, data, None), data).backward()
            opt.step()
        model.eval()
        lora_b_max = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_b" in n)
        save_checkpoint(model, rt, a.save, None, hf_dir=source_hf_dir(src))
    with torch.inference_mode():
        logits = stage_forward(model, IDS, None)
    if ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits.float(), "lora_b_max": lora_b_max}, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
