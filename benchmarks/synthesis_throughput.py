"""Synthesis throughput: Magpie-style conversations with batch 1 vs batched generation, on the
same model, conversation count and settings, in one process (default: SmolLM2-135M, fp32).

    .venv/bin/python benchmarks/synthesis_throughput.py [--batch-sizes 1,8,16]
        [--conversations 16] [--max-new-tokens 64] [--max-question-tokens 48] [--repeats 1]

Each batch size synthesizes the same number of conversations from the same seed (questions
sampled, answers greedy); repeats alternate between the batch sizes so machine noise hits
all of them. Sequences = every question and answer generated (rejected ones included), tokens =
every generated token. Prints one table row per batch size (median wall time of the repeats).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-question-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    import torch

    from post_training.config import GenerateConfig, ModelConfig, SourceConfig, SynthConfig
    from post_training.generate import stop_token_ids
    from post_training.model_builder import setup_model
    from post_training.runtime import ParallelConfig, init_runtime
    from post_training.synthesis import Synthesizer, batched_generator

    rt = init_runtime(ParallelConfig(device="cpu"))
    model, tok, hf_config = setup_model(SourceConfig(), ModelConfig(), rt)
    gcfg = GenerateConfig(max_new_tokens=a.max_new_tokens, stop_token_ids=stop_token_ids(tok, hf_config))
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    runs: dict[int, list] = {b: [] for b in sizes}
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, {a.conversations} conversations, "
          f"questions <= {a.max_question_tokens} tokens (sampled), answers <= {a.max_new_tokens} (greedy)",
          flush=True)
    for rep in range(a.repeats):
        for b in sizes if rep % 2 == 0 else sizes[::-1]:
            synth = SynthConfig(num_conversations=a.conversations, batch_size=b,
                                max_question_tokens=a.max_question_tokens)
            syn = Synthesizer(tok, batched_generator(model), synth, gcfg, 4096, seed=a.seed)
            t0 = time.perf_counter()
            kept = syn.run(a.conversations)
            wall = time.perf_counter() - t0
            runs[b].append((wall, len(kept), syn.stats))
            print(f"  batch {b:>3}: {wall:.1f} s, {len(kept)} kept, {syn.stats.sequences} sequences, "
                  f"{syn.stats.tokens} tokens", flush=True)
    print("| batch | conversations kept | sequences | tokens | wall s | sequences/s | tokens/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")

    def tps(b):
        return runs[b][0][2].tokens / statistics.median(r[0] for r in runs[b])

    base = tps(min(sizes))  # speed-up against the smallest batch (1 by default)
    for b in sizes:
        wall = statistics.median(r[0] for r in runs[b])
        _, kept, st = runs[b][0]
        print(f"| {b} | {kept} | {st.sequences} | {st.tokens} | {wall:.1f} | {st.sequences / wall:.2f} | "
              f"{tps(b):.1f} | {tps(b) / base:.2f}x |")


if __name__ == "__main__":
    main()
