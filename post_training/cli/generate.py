"""Chat generation: ``scripts/generate.sh`` (Megatron-LM's generate.py counterpart)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.data import load_prompts, render_prompt
from post_training.utils import UsageError, print_rank_0, rank

BEGIN, ANSWER, END = "===== PROMPT {} =====", "===== ANSWER {} =====", "===== END {} ====="
GROUPS = ["runtime", "model", "source", "prompts", "generate", "draft", "report"]


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="generate.sh",
                           description="answer prompts with the KV cache (greedy or sampled)")
    hf.check_source(args.source, args.runtime)
    prompts = load_prompts(args.prompts.prompts_file)
    # Render every prompt before megatron-core is even imported: a template problem fails fast.
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    rendered = [render_prompt(p, tok, chat_template=args.prompts.chat_template) for p in prompts]
    dcfg = args.draft
    if dcfg.enabled:  # refuse what speculative decoding cannot honour before any rank loads a model
        from post_training.speculative.drafters import check_draft

        if args.model.transformer_impl == "transformer_engine":
            raise UsageError("--draft needs the local layer spec (its SDPA attention is the one whose "
                             "multi-token verify against the KV cache is tested): drop "
                             "--transformer-impl transformer_engine")
        target_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
        check_draft(dcfg, tok, target_cfg, args.runtime.tp, args.runtime.pp, load=args.source.load)
    if args.preflight:
        return 0
    from post_training.generate import generate, stop_token_ids
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime, memory_report

    rt = init_runtime(args.runtime)
    model, tok, hf_config = setup_model(args.source, args.model, rt, hf_dir=hf_dir)
    gcfg = dataclasses.replace(args.generate, stop_token_ids=stop_token_ids(tok, hf_config))
    drafter = None
    if dcfg.enabled:
        from post_training.speculative import build_drafter, speculative_generate

        drafter = build_drafter(dcfg, tok, hf_config, rt, args.model, target=model, load=args.source.load)
    results, totals = [], [0, 0, 0.0]  # tokens, target steps, seconds
    for i, (prompt, ids) in enumerate(zip(prompts, rendered)):
        t0 = time.perf_counter()
        if drafter is None:
            out = generate(model, ids, gcfg, max_seq_length=args.model.seq_length, seed=args.runtime.seed)
            steps = len(out)
        else:
            out, st = speculative_generate(model, ids, drafter, gcfg, dcfg.draft_steps,
                                           max_seq_length=args.model.seq_length, seed=args.runtime.seed)
            steps = st.steps
        dt = time.perf_counter() - t0
        totals = [totals[0] + len(out), totals[1] + steps, totals[2] + dt]
        text = tok.decode([t for t in out if t not in gcfg.stop_token_ids], skip_special_tokens=False)
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        print_rank_0(f"{BEGIN.format(i)}\n{shown}\n{ANSWER.format(i)}\n{text}\n{END.format(i)}")
        spec = f", {steps} target steps, AL {len(out) / steps:.2f}" if drafter is not None else ""
        print_rank_0(f"[{len(out)} tokens, {len(out) / dt:.1f} tok/s{spec}]")
        results.append({"prompt": prompt, "answer": text, "tokens": out, "target_steps": steps})
    if drafter is not None:  # AL as a ratio of sums over the prompts (Megatron-LM's)
        print_rank_0(f"speculative ({dcfg.draft}, K={dcfg.draft_steps}): {totals[0]} tokens in "
                     f"{totals[1]} target steps, {totals[0] / totals[2]:.1f} tok/s, "
                     f"AL {totals[0] / max(totals[1], 1):.2f}")
    print_rank_0(memory_report("memory"))
    if args.report.json_out and rank() == 0:
        Path(args.report.json_out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
