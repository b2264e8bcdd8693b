"""Chat generation: ``scripts/generate.sh`` (Megatron-LM's generate.py counterpart)."""
from __future__ import annotations

import json
import time

from post_training import arguments
from post_training.checkpointing import load_tokenizer, resolve_hf_dir, setup_model
from post_training.cli import run_entry, split_preflight
from post_training.data import load_prompts, render_prompt
from post_training.generate import generate
from post_training.runtime import init_runtime, memory_report
from post_training.utils import print_rank_0, rank

BEGIN, ANSWER, END = "===== PROMPT {} =====", "===== ANSWER {} =====", "===== END {} ====="


def stop_ids(tokenizer, hf_config) -> list[int]:
    ids = set()
    for src in (tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)):
        ids.update(src if isinstance(src, list) else [src] if src is not None else [])
    return sorted(ids)


def main(argv: list[str]) -> int:
    preflight, argv = split_preflight(argv)
    ns = arguments.parse(argv, arguments.add_generate_args, prog="generate")
    par, mcfg, src = arguments.common_configs(ns)
    arguments.generate_config(ns)  # validates sampling flags
    src.validate(par)
    prompts = load_prompts(ns.prompts_file)
    if preflight:
        return 0
    rt = init_runtime(par)
    # Render every prompt before the model loads: a template problem fails fast.
    tok = load_tokenizer(resolve_hf_dir(src))
    rendered = [render_prompt(p, tok, chat_template=not ns.no_chat_template) for p in prompts]
    model, tok, hf_config = setup_model(src, mcfg, rt)
    gcfg = arguments.generate_config(ns, stop_ids(tok, hf_config))
    results = []
    for i, (prompt, ids) in enumerate(zip(prompts, rendered)):
        t0 = time.perf_counter()
        out = generate(model, ids, gcfg, max_seq_length=mcfg.seq_length)
        dt = time.perf_counter() - t0
        text = tok.decode([t for t in out if t not in gcfg.stop_token_ids], skip_special_tokens=False)
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        print_rank_0(f"{BEGIN.format(i)}\n{shown}\n{ANSWER.format(i)}\n{text}\n{END.format(i)}")
        print_rank_0(f"[{len(out)} tokens, {len(out) / dt:.1f} tok/s]")
        results.append({"prompt": prompt, "answer": text, "tokens": out})
    print_rank_0(memory_report("memory"))
    if ns.json_out and rank() == 0:
        with open(ns.json_out, "w") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
