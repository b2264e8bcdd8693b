"""Minitron pruning: ``scripts/prune.sh [CONF] --prune-export-config '{"num_layers": 15}'``
(Megatron-LM's examples/post_training/modelopt/prune.py counterpart).

Loads the model at TP=1 (PP allowed), ranks layers / channels / heads on calibration data,
prunes with ModelOpt's ``mcore_minitron``, scores the built-in eval text before and after, and
saves a dist checkpoint (``MLM_MODEL_SAVE``) whose ``hf_config/config.json`` states the pruned
sizes, so every script (generate, evaluate, export, the training scripts' --load) builds the
right shapes.
"""
from __future__ import annotations

import json
from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.data import builtin_text, token_chunks
from post_training.io import layout as cio
from post_training.pruning import HF_NAMES, check_targets
from post_training.utils import UsageError, print_rank_0, rank

GROUPS = ["runtime", "model", "source", "save", "prune", "calib", "report"]
PPL_WINDOW = 512  # tokens per perplexity window (before / after)


def declared_config(src) -> dict:
    """The source's config.json as far as it is known before anything loads (the conf's
    ``expect`` for the embedded model: no intermediate_size there; checked again after load)."""
    if src.load and hf.load_kind(src.load) == "dist":
        path = cio.find_checkpoint(src.load).parent / cio.HF_CONFIG_DIR / "config.json"
    elif src.load:
        path = Path(src.load) / "config.json"
    elif src.pretrained_model_path:
        path = Path(src.pretrained_model_path) / "config.json"
    else:
        return dict(hf.load_conf(src.model_conf).expect)
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_early(targets: dict, config: dict) -> None:
    known = {k: v for k, v in targets.items() if config.get(HF_NAMES[k]) is not None}
    if config.get("num_attention_heads") is not None:
        check_targets(known, config)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _report(args, res, n_samples: int, saved: str, total: float) -> list[str]:
    b, a = res.before, res.after
    lines = ["", f"| prune {json.dumps(res.export_config)} | before | after |", "|---|---|---|",
             f"| parameters | {_fmt_params(res.params_before)} | {_fmt_params(res.params_after)} "
             f"({res.params_after / res.params_before:.0%}) |"]
    for key in HF_NAMES:
        if b[key] != a[key] or key == "num_layers":
            lines.append(f"| {key} | {b[key]} | {a[key]} |")
    if res.ppl_before is not None:
        delta = 100 * (res.ppl_after / res.ppl_before - 1)
        lines.append(f"| perplexity, built-in eval text ({args.prune.ppl_windows} x {PPL_WINDOW} tokens) "
                     f"| {res.ppl_before:.3f} | {res.ppl_after:.3f} ({delta:+.1f}%) |")
    if res.layer_scores:
        lines.append(f"layer importance (1 - cos(input, output) summed over {n_samples} samples; "
                     "1-indexed, * = dropped):")
        lines.append("  " + "  ".join(f"{n}:{s:.3f}{'*' if n in res.dropped else ''}"
                                      for n, s in sorted(res.layer_scores.items())))
    if res.dropped:
        lines.append(f"layers dropped ({len(res.dropped)}): {res.dropped}")
        lines.append(f"layers kept ({len(res.kept)}): {res.kept}")
    lines.append(f"calibration: {n_samples} x {args.calib.calib_seq_length} tokens "
                 f"({args.calib.calib_dataset}); pruned in {res.seconds:.1f}s, {total:.1f}s in all")
    lines += [f"checkpoint: {saved}", "next:",
              f"  MLM_MODEL_CKPT={saved} bash scripts/evaluate.sh",
              f"  MLM_MODEL_CKPT={saved} bash scripts/generate.sh",
              f"  MLM_MODEL_CKPT={saved} EXPORT_DIR={saved}-hf bash scripts/export.sh",
              "  distill from the unpruned model to recover quality (scripts/distill.sh, "
              f"--load {saved})"]
    return lines


def main(argv: list[str]) -> int:
    import time

    t_start = time.perf_counter()
    args = arguments.parse(argv, GROUPS, prog="prune.sh",
                           description="Minitron depth/width pruning with ModelOpt (TP=1, PP allowed); "
                                       "perplexity and parameters before/after")
    if args.runtime.tp != 1:
        raise UsageError(f"pruning runs at TP=1 (ModelOpt's Minitron, as Megatron-LM's prune.py); "
                         f"got TP={args.runtime.tp}: use PP to spread the model over ranks")
    if not args.save.save:
        raise UsageError("prune.sh needs --save (or MLM_MODEL_SAVE): where the pruned checkpoint goes")
    hf.check_source(args.source, args.runtime)
    _check_early(args.prune.targets, declared_config(args.source))
    if args.preflight:
        return 0
    from post_training.evaluation.perplexity import perplexity
    from post_training.inference import stage_forward
    from post_training.model_builder import setup_model
    from post_training.pruning import prune_model, save_pruned
    from post_training.quantization.calibration import calibration_samples, forward_loop
    from post_training.runtime import init_runtime

    rt = init_runtime(args.runtime)
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    samples = calibration_samples(args.calib, tok)  # bad calibration data fails before the model loads
    n_ppl = args.prune.ppl_windows
    windows = token_chunks(builtin_text("eval"), tok, PPL_WINDOW, n_ppl) if n_ppl else None
    model, tok, hf_config = setup_model(args.source, args.model, rt, hf_dir=hf_dir)
    export_config = check_targets(args.prune.targets, hf_config)  # now with every size known
    ppl_before = perplexity(model, windows, progress=rank() == 0).perplexity if windows else None
    loop = forward_loop(samples, lambda m, t: stage_forward(m, t, None), progress=rank() == 0)
    res = prune_model(model, export_config, loop)
    res.ppl_before = ppl_before
    res.ppl_after = perplexity(model, windows, progress=rank() == 0).perplexity if windows else None
    saved = save_pruned(model, rt, args.save.save, Path(hf_config.name_or_path), res.before,
                        model_conf=args.source.model_conf, keep_last=args.save.keep_last)
    print_rank_0("\n".join(_report(args, res, len(samples), args.save.save, time.perf_counter() - t_start)))
    if args.report.json_out and rank() == 0:
        Path(args.report.json_out).write_text(json.dumps({
            "export_config": res.export_config, "before": res.before, "after": res.after,
            "params_before": res.params_before, "params_after": res.params_after,
            "layer_scores": {str(k): v for k, v in res.layer_scores.items()}, "dropped": res.dropped,
            "kept": res.kept, "perplexity_before": res.ppl_before, "perplexity_after": res.ppl_after,
            "ppl_windows": n_ppl, "calib_dataset": args.calib.calib_dataset, "calib_samples": len(samples),
            "calib_seq_length": args.calib.calib_seq_length, "seconds": res.seconds,
            "checkpoint": str(saved),
        }, indent=1))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
