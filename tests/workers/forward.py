"""Worker: full-sequence logits and greedy tokens of a model at a given TP/PP.

Run under torchrun. The rank holding the last stage with TP rank 0 writes the result.
"""
import argparse

import torch
from megatron.core import parallel_state as ps

from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.data import render_prompt
from post_training.generate import stage_forward, generate
from post_training.config import GenerateConfig
from post_training.config import ModelConfig
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompt", default="What is the capital of France?")
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=a.hf_dir), ModelConfig(), rt)
    ids = render_prompt(a.prompt, tok)
    with torch.inference_mode():
        logits = stage_forward(model, torch.tensor([ids]), None)
    tokens = generate(model, ids, GenerateConfig(max_new_tokens=a.max_new_tokens))
    if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits, "tokens": tokens, "ids": ids}, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
