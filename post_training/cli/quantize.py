"""PTQ: ``scripts/quantize.sh [CONF] [QUANT_CFG]`` (Megatron-LM's quantize.py counterpart).

Loads the model, answers a few prompts, calibrates and quantizes with ModelOpt, prints the
quantization summary and the answers again, and saves a dist checkpoint (``MLM_MODEL_SAVE``)
with the ModelOpt state that every other script reloads at any TP/PP.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.config import AUTO
from post_training.data import builtin_text, load_prompts, render_prompt, token_chunks
from post_training.quantization.recipes import auto_formats, resolve_quant_cfg
from post_training.utils import UsageError, print_rank_0, rank

GROUPS = ["runtime", "model", "source", "save", "quantize", "calib", "prompts", "generate", "report"]
DEFAULTS = {"generate.max_new_tokens": 48}  # short answers: they are there to compare
PPL_WINDOW = 512  # tokens per perplexity window (before / after)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _report(args, res, n_samples: int, saved: str | None) -> list[str]:
    """The closing table: quality, size, time, where the checkpoint is and what to run next."""
    q = args.quantize
    lines = ["", f"| {q.quant_cfg} | before | after |", "|---|---|---|"]
    if res.ppl_before is not None:
        delta = 100 * (res.ppl_after / res.ppl_before - 1)
        lines.append(f"| perplexity, built-in eval text ({q.ppl_windows} x {PPL_WINDOW} tokens) "
                     f"| {res.ppl_before:.3f} | {res.ppl_after:.3f} ({delta:+.1f}%) |")
    lines.append(f"| weights (scales of blocks included) | {_mb(res.bytes_plain)} | "
                 f"{_mb(res.bytes_quantized)} ({res.bytes_quantized / res.bytes_plain:.0%}) |")
    lines.append(f"calibration: {n_samples} x {args.calib.calib_seq_length} tokens ({args.calib.calib_dataset}), "
                 f"quantized in {res.seconds:.1f}s")
    if saved:
        lines += [f"checkpoint: {saved}", "next:",
                  f"  MLM_MODEL_CKPT={saved} EXPORT_DIR={saved}-hf bash scripts/export.sh",
                  f"  MLM_MODEL_CKPT={saved} bash scripts/evaluate.sh",
                  f"  MLM_MODEL_CKPT={saved} bash scripts/generate.sh"]
    else:
        lines.append("checkpoint: not saved (set MLM_MODEL_SAVE or pass --save)")
    return lines


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="quantize.sh", defaults=DEFAULTS,
                           description="post-training quantization with ModelOpt; answers before/after",
                           script_env={"QUANT_CFG (second argument)": "format, as --export-quant-cfg"})
    qcfg = args.quantize
    hf.check_source(args.source, args.runtime)
    resolve_quant_cfg(qcfg.quant_cfg, qcfg.kv_cache_quant)
    if qcfg.quant_cfg == AUTO:
        auto_formats(qcfg)
        if args.runtime.pp > 1:
            raise UsageError("--export-quant-cfg auto needs PP=1: its sensitivity scores backpropagate "
                             "through the whole model in one stage (use TP to spread it)")
    prompts = load_prompts(args.prompts.prompts_file)
    if args.preflight:
        return 0
    from post_training.checkpointing import save_checkpoint
    from post_training.generate import stop_token_ids
    from post_training.model_builder import setup_model
    from post_training.quantization.calibration import calibration_samples
    from post_training.quantization.ptq import run_ptq
    from post_training.quantization.report import full_table
    from post_training.runtime import init_runtime, memory_report

    rt = init_runtime(args.runtime)
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    samples = calibration_samples(args.calib, tok)  # bad calibration data fails before the model loads
    windows = token_chunks(builtin_text("eval"), tok, PPL_WINDOW, qcfg.ppl_windows) if qcfg.ppl_windows else None
    rendered = [render_prompt(p, tok, chat_template=args.prompts.chat_template) for p in prompts]
    # auto-quantize scores layers with gradients, so its model is not frozen
    model, tok, hf_config = setup_model(args.source, args.model, rt, inference=qcfg.quant_cfg != AUTO,
                                        hf_dir=hf_dir)
    gcfg = dataclasses.replace(args.generate, stop_token_ids=stop_token_ids(tok, hf_config))

    def save(quantized) -> None:
        save_checkpoint(quantized, rt, args.save.save, None, hf_dir=Path(hf_config.name_or_path),
                        model_conf=args.source.model_conf, keep_last=args.save.keep_last)
        if rt.tp_rank == 0 and rt.dp_rank == 0:  # ModelOpt's full table, one file per stage
            name = "quant_summary.txt" if rt.pp == 1 else f"quant_summary.pp{rt.pp_rank}.txt"
            (Path(args.save.save) / name).write_text(full_table(quantized))

    res = run_ptq(model, tok, qcfg, samples, rendered, gcfg, rt, save=save if args.save.save else None,
                  eval_windows=windows, verbose=args.report.verbose)
    for i, (p, a, b) in enumerate(zip(prompts, res.before, res.after)):
        print_rank_0(f"===== PROMPT {i} =====\n{p}\n----- before -----\n{a.strip()}\n----- after -----\n"
                     f"{b.strip()}\n===== END {i} =====")
    print_rank_0("\n".join(_report(args, res, len(samples), args.save.save)))
    if args.report.verbose:
        print_rank_0(memory_report("memory"))
    if args.report.json_out and rank() == 0:
        Path(args.report.json_out).write_text(json.dumps({
            "quant_cfg": qcfg.quant_cfg, "calib_dataset": args.calib.calib_dataset, "calib_samples": len(samples),
            "calib_seq_length": args.calib.calib_seq_length, "seconds": res.seconds,
            "perplexity_before": res.ppl_before, "perplexity_after": res.ppl_after,
            "weight_bytes": res.bytes_quantized, "weight_bytes_unquantized": res.bytes_plain,
            "checkpoint": args.save.save,
            "answers": [{"prompt": p, "before": a, "after": b} for p, a, b in zip(prompts, res.before, res.after)],
        }, indent=1, ensure_ascii=False))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
