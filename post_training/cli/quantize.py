"""PTQ: ``scripts/quantize.sh [CONF] [QUANT_CFG]`` (Megatron-LM's quantize.py counterpart).

Loads the model, answers a few prompts, calibrates and quantizes with ModelOpt, prints the
quantization summary and the answers again, and saves a dist checkpoint (``MLM_MODEL_SAVE``)
with the ModelOpt state that every other script reloads at any TP/PP.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.config import AUTO
from post_training.data import load_prompts, render_prompt
from post_training.quantization.recipes import auto_formats, resolve_quant_cfg
from post_training.utils import UsageError, print_rank_0

GROUPS = ["runtime", "model", "source", "save", "quantize", "prompts", "generate"]
DEFAULTS = {"generate.max_new_tokens": 48}  # short answers: they are there to compare


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
    from post_training.runtime import init_runtime, memory_report

    rt = init_runtime(args.runtime)
    tok = hf.load_tokenizer(hf.source_hf_dir(args.source))
    samples = calibration_samples(qcfg, tok)  # bad calibration data fails before the model loads
    rendered = [render_prompt(p, tok, chat_template=args.prompts.chat_template) for p in prompts]
    # auto-quantize scores layers with gradients, so its model is not frozen
    model, tok, hf_config = setup_model(args.source, args.model, rt, inference=qcfg.quant_cfg != AUTO)
    gcfg = dataclasses.replace(args.generate, stop_token_ids=stop_token_ids(tok, hf_config))

    def save(quantized) -> None:
        save_checkpoint(quantized, rt, args.save.save, None, hf_dir=Path(hf_config.name_or_path),
                        model_conf=args.source.model_conf, keep_last=args.save.keep_last)

    res = run_ptq(model, tok, qcfg, samples, rendered, gcfg, rt, save=save if args.save.save else None)
    for i, (p, a, b) in enumerate(zip(prompts, res.before, res.after)):
        print_rank_0(f"===== PROMPT {i} =====\n{p}\n----- before -----\n{a}\n----- after -----\n{b}\n"
                     f"===== END {i} =====")
    print_rank_0(memory_report("memory"))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
