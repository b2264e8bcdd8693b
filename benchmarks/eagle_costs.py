"""Costs that predict the speed-up of a trained head (EAGLE-3 / Medusa) on CPU, one process:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eagle_costs.py [--context 200] [--reps 30]

Target: the default SmolLM2-135M-Instruct (fp32). At a fixed context (the cache rolled back
after every timed forward) it times, alternating, with medians:

* t1: one plain decode step (1 token, last logits);
* v(K+1): one verify forward of K+1 tokens (all logits), without hidden capture, with the
  EAGLE-3 aux capture (3 layers) and with the final-hidden capture (EAGLE-1 / Medusa);
* d: one EAGLE-3 chain step of a draft layer shaped like one SmolLM2 layer (append one entry
  to the draft KV cache, lm_head), for draft vocab 8192 and the full 49152; the first step of a
  proposal (fc over the accepted rows + one entry per row) with 2 rows; one Medusa head.

and prints the predicted speed-up AL / (v(K+1)/t1 + K*d/t1) for a few AL values (random heads:
what a head costs, not what it accepts).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--draft-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    from post_training import hf
    from post_training.config import ModelConfig, SourceConfig
    from post_training.inference import KVCache
    from post_training.inference.hidden import HiddenCapture, HiddenSpec
    from post_training.model_builder import setup_model
    from post_training.runtime import ParallelConfig, cpu_compat, init_runtime
    from post_training.speculative.eagle_draft import build_head
    from post_training.speculative.head_layout import (HeadConfig, default_aux_layers, head_config_for,
                                                       random_head_state)
    from post_training.speculative.head_drafter import target_embedding

    torch.set_num_threads(a.threads)
    rt = init_runtime(ParallelConfig(device="cpu"))
    model, _, _ = setup_model(SourceConfig(), ModelConfig(), rt)
    tcfg = json.loads((Path(hf.source_hf_dir(SourceConfig())) / "config.json").read_text())
    K = a.draft_steps
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 40000, (1, a.context), generator=g)
    cache = KVCache(1, a.context + K + 2)
    aux = HiddenSpec(layers=tuple(default_aux_layers(tcfg["num_hidden_layers"])))
    final = HiddenSpec(final=True)
    emb = target_embedding(model)

    def target(n, spec=None):
        inp = torch.randint(100, 40000, (1, n), generator=g)

        def run():
            if spec is None:
                cache.forward(model, inp, all_logits=n > 1)
            else:
                with HiddenCapture(model, spec) as cap:
                    cache.forward(model, inp, all_logits=True)
                cap.result(n, 1)
            cache.truncate(a.context)
        return run

    heads = {}
    for dv in (8192, tcfg["vocab_size"]):
        cfg = head_config_for(tcfg, "eagle3", dv if dv != tcfg["vocab_size"] else None)
        state = random_head_state(cfg, seed=1)
        if "lm_head.weight" not in state:  # the full vocabulary: the target's (tied) output layer
            state["lm_head.weight"] = emb[:dv].clone()
        heads[dv] = build_head(HeadConfig.from_hf(cfg), state)
    mcfg = head_config_for(tcfg, "medusa", medusa_heads=1)
    medusa = build_head(HeadConfig.from_hf(mcfg), random_head_state(mcfg, seed=1))
    width = len(aux.layers) * tcfg["hidden_size"]

    def chain(head):
        head.truncate(0)
        x = head.project(torch.randn(a.context, width) * 0.1)
        head.append(emb[ctx[0]], x)  # the real entries of the context
        one = torch.randn(1, tcfg["hidden_size"])

        def run():
            head.append(emb[ctx[0, :1]], one)
            head.truncate(a.context)
        return run

    def first(head):
        rows = torch.randn(2, width) * 0.1

        def run():
            head.truncate(a.context - 2)
            head.append(emb[ctx[0, :2]], head.project(rows))
        return run

    hid = torch.randn(tcfg["hidden_size"])
    cases = {"t1 decode": target(1), f"v({K + 1})": target(K + 1), f"v({K + 1}) + aux capture": target(K + 1, aux),
             f"v({K + 1}) + final capture": target(K + 1, final)}
    for dv, head in heads.items():
        cases[f"d eagle3 chain step, vocab {dv}"] = chain(head)
        cases[f"d eagle3 first step (2 rows), vocab {dv}"] = first(head)
    cases["d medusa head"] = lambda: medusa.logits(hid, 1)
    with torch.inference_mode(), cpu_compat.device_mode_suspended():
        cache.forward(model, ctx)
        runs = cases
        times = {n: [] for n in runs}
        for _ in range(3):  # warm-up
            for f in runs.values():
                f()
        for _ in range(a.reps):
            for n, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    t1 = med["t1 decode"]
    print(f"SmolLM2-135M fp32, context {a.context}, K={K}, {a.threads} thread(s), median of {a.reps}")
    for n, ms in med.items():
        print(f"  {n:<40} {ms:8.2f} ms  {ms / t1:6.3f} t1")
    v = med[f"v({K + 1}) + aux capture"]
    for dv in heads:
        d = med[f"d eagle3 chain step, vocab {dv}"]
        cost = v / t1 + K * d / t1
        pred = ", ".join(f"AL {al}: {al / cost:.2f}x" for al in (1.5, 2.0, 2.5, 3.0))
        print(f"  eagle3 vocab {dv}: step cost {cost:.3f} t1 -> {pred}")


if __name__ == "__main__":
    main()
