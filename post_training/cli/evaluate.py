"""Perplexity (and optional zero-shot MMLU-format accuracy): ``scripts/evaluate.sh``.

The last line on stdout is ``perplexity <value>`` (other tools parse it), or with
``--skip-perplexity`` (``scripts/mmlu.sh``) ``mmlu accuracy <value>``. Every input is checked
before the model loads, the text included (a text shorter than one window is an error), so
``--preflight`` rejects bad input before torchrun starts N ranks, without importing megatron-core.
"""
from __future__ import annotations

import json
from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.evaluation.inputs import prepare_inputs
from post_training.utils import print_rank_0, rank

GROUPS = ["runtime", "model", "source", "batch", "eval", "report"]


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="evaluate.sh",
                           description="perplexity on a text (and zero-shot MMLU-format accuracy)")
    hf.check_source(args.source, args.runtime)
    if args.preflight:
        prepare_inputs(args.eval, args.source, args.model.seq_length)
        return 0
    from post_training.evaluation.perplexity import evaluate_model
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime, memory_report

    rt = init_runtime(args.runtime)
    windows, questions = prepare_inputs(args.eval, args.source, args.model.seq_length)
    model, tok, _ = setup_model(args.source, args.model, rt)
    report = evaluate_model(model, tok, windows, questions, args.eval, args.batch.micro_batch_size)
    print_rank_0(f"[{report['seconds']:.1f}s, TP={rt.tp} PP={rt.pp} DP={rt.dp}] {memory_report('memory')}")
    if args.report.json_out and rank() == 0:
        report.update(seq_length=args.model.seq_length, micro_batch_size=args.batch.micro_batch_size,
                      model=args.source.load or args.source.pretrained_model_path or args.source.model_conf,
                      model_conf=args.source.model_conf, dtype=args.model.dtype, tp=rt.tp, pp=rt.pp, dp=rt.dp)
        Path(args.report.json_out).write_text(json.dumps(report, indent=1))
    if "perplexity" in report:
        print_rank_0(f"perplexity {report['perplexity']:.6f}")
    else:  # mmlu.sh: the accuracy is the result
        print_rank_0(f"mmlu accuracy {report['accuracy']:.6f}")
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
