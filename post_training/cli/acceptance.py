"""Acceptance length of a drafter on MT-Bench-style prompts: ``scripts/acceptance.sh`` (and
``scripts/validate.sh``, Megatron-LM's name).

Prints a table per category and overall (each AL definition named), writes ``--json-out`` and a
PNG bar chart (``--plot``, default beside the json), and ends with the line
``average AL <value>`` (generated tokens / target steps). The prompt set, the categories and the
prompt lengths are checked before megatron-core is imported (``--preflight``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.utils import UsageError, print_rank_0, rank

GROUPS = ["runtime", "model", "source", "draft", "acceptance", "report"]


def _prepare(args, tok) -> list:
    """The selected prompts, each checked to fit --seq-length with its answers."""
    from post_training.data import render_prompt
    from post_training.speculative.mtbench import load_mtbench, select_prompts, turn_messages

    acc = args.acceptance
    prompts = select_prompts(load_mtbench(acc.mtbench_path), acc.category_list, acc.num_prompts, acc.turns)
    seq = args.model.seq_length
    for p in prompts:
        # The second turn holds the first answer (at most --osl tokens; an empty one stands in).
        chat = turn_messages(p, [""] * (acc.turns - 1))
        need = len(render_prompt(chat, tok)) + acc.turns * acc.osl
        if need > seq:
            raise UsageError(f"prompt {p.id} ({p.category}): {need - acc.turns * acc.osl} prompt tokens "
                             f"+ {acc.turns} x --osl {acc.osl} exceeds --seq-length {seq}")
    return prompts


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="acceptance.sh", defaults={"draft.draft": "ngram"},
                           description="acceptance length of a drafter on MT-Bench-style prompts")
    if args.draft.draft == "none":
        raise UsageError("acceptance needs a drafter: --draft ngram, model, eagle or medusa")
    hf.check_source(args.source, args.runtime)
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    prompts = _prepare(args, tok)
    # A drafter that needs training, or a draft model of another tokenizer / layout: refused
    # before any rank loads a model.
    from post_training.speculative.drafters import check_draft

    target_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    check_draft(args.draft, tok, target_cfg, args.runtime.tp, args.runtime.pp, load=args.source.load)
    if args.preflight:
        return 0
    from post_training.generate import stop_token_ids
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime
    from post_training.speculative import build_drafter
    from post_training.speculative.acceptance import format_report, measure_acceptance, summarize, write_plot

    rt = init_runtime(args.runtime)
    model, tok, hf_config = setup_model(args.source, args.model, rt, hf_dir=hf_dir)
    drafter = build_drafter(args.draft, tok, hf_config, rt, args.model, target=model, load=args.source.load)
    acc, k = args.acceptance, args.draft.draft_steps

    def progress(r) -> None:
        al = r.tokens / r.steps if r.steps else 0.0
        print_rank_0(f"  {r.category:<12} {r.prompt_id:>6} turn {r.turn}: {r.tokens} tokens, "
                     f"{r.steps} steps, AL {al:.2f}")

    t0 = time.perf_counter()
    results = measure_acceptance(model, tok, drafter, prompts, osl=acc.osl, draft_steps=k, turns=acc.turns,
                                 stop_token_ids=stop_token_ids(tok, hf_config),
                                 max_seq_length=args.model.seq_length, seed=args.runtime.seed,
                                 on_turn=progress)
    meta = {"draft": args.draft.draft, "draft_steps": k, "osl": acc.osl, "turns": acc.turns,
            "prompts": acc.mtbench_path, "seconds": round(time.perf_counter() - t0, 1)}
    summary = summarize(results, k, meta)
    plot = acc.plot or (str(Path(args.report.json_out).with_suffix(".png")) if args.report.json_out else None)
    if rank() == 0:
        if args.report.json_out:
            summary["meta"].update(model=args.source.load or args.source.pretrained_model_path
                                   or args.source.model_conf, tp=rt.tp, pp=rt.pp)
            Path(args.report.json_out).write_text(json.dumps(summary, indent=1))
        if plot:
            print(f"plot: {write_plot(summary, plot)}")
    print_rank_0(format_report(summary))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
