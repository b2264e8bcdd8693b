"""Generation throughput: the toolkit (megatron-core GPTModel + static KV cache) vs
transformers ``generate`` on the same model, prompt and token count, in one process.

    .venv/bin/python benchmarks/generate_throughput.py [--new-tokens 128] [--repeats 3]

Both run greedy with EOS ignored so every run produces exactly --new-tokens tokens; runs
alternate between the two so machine noise hits both. Prints the median tok/s and the ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", default="Explain how a transformer language model generates text.")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from post_training.config import SourceConfig
    from post_training.model_builder import setup_model
    from post_training.data import render_prompt
    from post_training.generate import generate
    from post_training.config import GenerateConfig
    from post_training.config import ModelConfig
    from post_training.runtime import ParallelConfig, cpu_compat, init_runtime

    rt = init_runtime(ParallelConfig())
    dtype = "bf16" if a.bf16 else "fp32"
    model, tok, _ = setup_model(SourceConfig(), ModelConfig(dtype=dtype), rt)
    hf = AutoModelForCausalLM.from_pretrained(tok.name_or_path, dtype=model.config.params_dtype).eval()
    ids = render_prompt(a.prompt, tok)
    cfg = GenerateConfig(max_new_tokens=a.new_tokens)

    def ours() -> list[int]:
        return generate(model, ids, cfg)

    def theirs() -> list[int]:
        # As in a plain transformers process: without the toolkit's device-rewriting
        # TorchFunctionMode, which init_runtime leaves pushed and which costs every torch
        # call Python dispatch (it made transformers ~20% slower here before this was fixed).
        with torch.inference_mode(), cpu_compat.device_mode_suspended():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=a.new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out[0, len(ids):].tolist()

    def timed(fn) -> tuple[float, list[int]]:
        t = time.perf_counter()
        toks = fn()
        return len(toks) / (time.perf_counter() - t), toks

    timed(ours), timed(theirs)  # warm-up
    rates: dict[str, list[float]] = {"toolkit": [], "transformers": []}
    same = True
    for _ in range(a.repeats):
        r1, t1 = timed(ours)
        r2, t2 = timed(theirs)
        rates["toolkit"].append(r1)
        rates["transformers"].append(r2)
        same &= t1 == t2
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"model SmolLM2-135M-Instruct {dtype}, prompt {len(ids)} tokens, {a.new_tokens} new tokens, "
          f"threads {torch.get_num_threads()}, cpu_count {os.cpu_count()}, device {rt.device}")
    for k, v in rates.items():
        print(f"{k:>13}: median {med[k]:6.1f} tok/s  runs {', '.join(f'{x:.1f}' for x in v)}")
    print(f"identical greedy tokens: {same}")
    print(f"ratio toolkit/transformers: {med['toolkit'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()
