"""Which default makes the quickstart's quantized answers stay sensible? Calibration sources x
FP8 recipes on the embedded SmolLM2, one process: perplexity on the built-in eval text and the
answers to the quickstart's three prompts (greedy, as the quickstart prints them).

    .venv/bin/python benchmarks/quickstart_recipes.py [--eval-windows 16] [--json-out F]
        [--combos FP8_DEFAULT_CFG:builtin:16x512,FP8_DEFAULT_CFG:builtin-chat:16x256,...]

Prints one row per (recipe, calibration source, samples x tokens): perplexity, delta, whether
answer 0 still names Paris, and the margin of its first token: log p(chosen) - log p(runner-up)
at the first answer position of prompt 0, where the FP8 model that answered "La femme au pays"
parted from "The capital of France is Paris" (a small margin is an answer that a change of
thread count or calibration sample can flip). Then the three answers of each row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--combos", default=",".join(
        f"{r}:{c}" for r in ("FP8_DEFAULT_CFG", "examples/quantization/fp8_fc2_act16.yaml")
        for c in ("builtin:16x512", "builtin-chat:16x256", "builtin-chat:28x256")))
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    from post_training.config import CalibConfig, GenerateConfig, ModelConfig, ParallelConfig, QuantizeConfig, SourceConfig
    from post_training.data import DEFAULT_PROMPTS, builtin_text, render_prompt, token_chunks
    from post_training.evaluation.perplexity import perplexity
    from post_training.generate import generate, stop_token_ids
    from post_training.inference import stage_forward
    from post_training.model_builder import setup_model
    from post_training.quantization.calibration import calibration_samples
    from post_training.quantization.ptq import calibrate_and_quantize
    from post_training.runtime import init_runtime

    rt = init_runtime(ParallelConfig(device="cpu"))
    model, tok, hf_config = setup_model(SourceConfig(), ModelConfig(), rt)
    windows = token_chunks(builtin_text("eval"), tok, a.seq_length, a.eval_windows)
    prompts = [render_prompt(p, tok) for p in DEFAULT_PROMPTS]
    gcfg = GenerateConfig(max_new_tokens=a.max_new_tokens, stop_token_ids=stop_token_ids(tok, hf_config))

    def measure(m) -> dict:
        import torch

        ppl = perplexity(m, windows).perplexity
        answers = [tok.decode([t for t in generate(m, ids, gcfg) if t not in gcfg.stop_token_ids])
                   for ids in prompts]
        with torch.inference_mode():
            logp = stage_forward(m, torch.tensor([prompts[0]]), None)[0, -1].float().log_softmax(-1)
        top = logp.topk(2)
        first = {"first": tok.decode(top.indices[:1]), "runner_up": tok.decode(top.indices[1:]),
                 "margin": float(top.values[0] - top.values[1])}
        return {"ppl": ppl, "paris": "Paris" in answers[0], **first, "answers": answers}

    rows = [{"recipe": "unquantized", "calib": "-", **measure(model)}]
    print(json.dumps(rows[0]), flush=True)
    for combo in [c.strip() for c in a.combos.split(",") if c.strip()]:
        import modelopt.torch.quantization as mtq

        recipe, calib, shape = combo.rsplit(":", 2)
        size, seq = (int(x) for x in shape.split("x"))
        q = QuantizeConfig(quant_cfg=recipe)
        c = CalibConfig(calib_dataset=calib, calib_size=size, calib_seq_length=seq)
        fresh, _, _ = setup_model(SourceConfig(), ModelConfig(), rt)
        t0 = time.perf_counter()
        fresh = calibrate_and_quantize(fresh, q, calibration_samples(c, tok))
        secs = time.perf_counter() - t0
        mtq.fold_weight(fresh)
        row = {"recipe": Path(recipe).name, "calib": f"{calib} {shape}", "seconds": round(secs, 1),
               **measure(fresh)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["ppl"]
    print("\n| recipe | calibration | perplexity | delta | answer 0 names Paris | first token (runner-up): margin |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['calib']} | {r['ppl']:.3f} | {100 * (r['ppl'] / base - 1):+.1f}% | "
              f"{'yes' if r['paris'] else 'no'} | {r['first']!r} ({r['runner_up']!r}): {r['margin']:.2f} |")
    for r in rows:
        print(f"\n{r['recipe']} / {r['calib']}:")
        for i, ans in enumerate(r["answers"]):
            print(f"  [{i}] {ans!r}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
