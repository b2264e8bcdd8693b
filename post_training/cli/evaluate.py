"""Perplexity (and optional zero-shot MMLU-format accuracy): ``scripts/evaluate.sh``.

The last line on stdout is ``perplexity <value>`` (other tools parse it). Every input is checked
before the model loads, the text included (a text shorter than one window is an error), so
``--preflight`` rejects bad input before torchrun starts N ranks.
"""
from __future__ import annotations

import argparse
import json
import time

from post_training import arguments
from post_training.checkpointing import SourceConfig, load_tokenizer, resolve_hf_dir, setup_model
from post_training.cli import run_entry, split_preflight
from post_training.evaluate import EvalConfig, eval_windows, load_eval_text, perplexity
from post_training.multiple_choice import Question, load_questions, score
from post_training.runtime import Runtime, init_runtime, memory_report
from post_training.utils import print_rank_0, rank


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text-path", default=None, help="plain UTF-8 text file to evaluate")
    g.add_argument("--eval-dataset", default=None,
                   help="datasets.load_dataset name (hub, when online) or a local "
                        "json/jsonl/parquet/csv/txt file or dataset directory")
    g.add_argument("--eval-dataset-split", default="test",
                   help="split of --eval-dataset (any name works for a local file)")
    g.add_argument("--eval-dataset-field", default="text", help="text column of --eval-dataset")
    g.add_argument("--eval-max-chunks", type=int, default=None,
                   help="evaluate at most N --seq-length windows")
    g.add_argument("--mmlu-path", default=None,
                   help="MMLU-format .csv/.jsonl: also report zero-shot multiple-choice accuracy")
    g.add_argument("--json-out", default=None, help="also write the report as json here")


def eval_config(ns: argparse.Namespace) -> EvalConfig:
    return EvalConfig(seq_length=ns.seq_length, micro_batch_size=ns.micro_batch_size,
                      max_chunks=ns.eval_max_chunks, text_path=ns.eval_text_path,
                      dataset=ns.eval_dataset, dataset_split=ns.eval_dataset_split,
                      dataset_field=ns.eval_dataset_field, mmlu_path=ns.mmlu_path,
                      json_out=ns.json_out)


def _model_name(src: SourceConfig) -> str:
    return src.load or src.pretrained_model_path or src.model_conf


def _report(ecfg: EvalConfig, src: SourceConfig, rt: Runtime, dtype: str, res, mc, seconds: float) -> dict:
    out = {"perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens, "chunks": res.chunks,
           "seq_length": ecfg.seq_length, "micro_batch_size": ecfg.micro_batch_size,
           "source": ecfg.source, "model": _model_name(src), "model_conf": src.model_conf,
           "dtype": dtype, "tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "seconds": round(seconds, 3)}
    if mc is not None:
        out.update(accuracy=mc.accuracy, mmlu={"path": ecfg.mmlu_path, "correct": mc.correct,
                                               "total": len(mc.answers), "predictions": mc.predictions})
    return out


def _inputs(ecfg: EvalConfig, src: SourceConfig) -> list[list[int]]:
    """Token windows, built before the model loads (a short text fails here)."""
    tok = load_tokenizer(resolve_hf_dir(src))
    return eval_windows(load_eval_text(ecfg), tok, ecfg)


def main(argv: list[str]) -> int:
    preflight, argv = split_preflight(argv)
    ns = arguments.parse(argv, add_evaluate_args, prog="evaluate")
    par, mcfg, src = arguments.common_configs(ns)
    ecfg = eval_config(ns)
    src.validate(par)
    questions: list[Question] | None = load_questions(ecfg.mmlu_path) if ecfg.mmlu_path else None
    if preflight:
        _inputs(ecfg, src)
        return 0
    rt = init_runtime(par)
    windows = _inputs(ecfg, src)
    model, tok, _ = setup_model(src, mcfg, rt)
    t0 = time.perf_counter()
    res = perplexity(model, windows, ecfg.micro_batch_size)
    print_rank_0(f"{res.chunks} windows x {ecfg.seq_length} tokens ({res.tokens} predicted) from "
                 f"{ecfg.source}: nll {res.nll:.6f}")
    mc = None
    if questions is not None:
        mc = score(model, questions, tok, ecfg.micro_batch_size)
        print_rank_0(f"mmlu accuracy {mc.accuracy:.4f} ({mc.correct}/{len(questions)}, "
                     f"zero-shot, {ecfg.mmlu_path})")
    seconds = time.perf_counter() - t0
    print_rank_0(f"[{seconds:.1f}s, TP={rt.tp} PP={rt.pp} DP={rt.dp}] {memory_report('memory')}")
    if ecfg.json_out and rank() == 0:
        with open(ecfg.json_out, "w") as f:
            json.dump(_report(ecfg, src, rt, mcfg.dtype, res, mc, seconds), f, indent=1)
    print_rank_0(f"perplexity {res.perplexity:.6f}")
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
