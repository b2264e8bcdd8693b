"""Write post_training/resources/chat_calibration.jsonl: the built-in chat calibration set.

The questions (post_training/resources/chat_questions.txt) were written for this project; the
answers are the embedded SmolLM2-135M-Instruct's own greedy answers, so calibration sees the
activations the model produces when it chats. None of it comes from MT-Bench.

    .venv/bin/python examples/data/make_chat_calibration.py [--max-new-tokens 160]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)

RES = ROOT / "post_training" / "resources"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", default=str(RES / "chat_calibration.jsonl"))
    a = ap.parse_args()

    from post_training.config import GenerateConfig, ModelConfig, ParallelConfig, SourceConfig
    from post_training.data import render_prompt
    from post_training.generate import generate, stop_token_ids
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime

    rt = init_runtime(ParallelConfig(device="cpu"))
    model, tok, hf_config = setup_model(SourceConfig(), ModelConfig(), rt)
    gcfg = GenerateConfig(max_new_tokens=a.max_new_tokens, stop_token_ids=stop_token_ids(tok, hf_config))
    rows = []
    for q in (RES / "chat_questions.txt").read_text().splitlines():
        out = generate(model, render_prompt(q, tok), gcfg)
        answer = tok.decode([t for t in out if t not in gcfg.stop_token_ids]).strip()
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
        print(f"{len(rows):3d} {q[:60]!r}: {len(out)} tokens", flush=True)
    Path(a.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {a.out}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
