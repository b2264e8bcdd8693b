"""PTQ: ``scripts/quantize.sh [CONF] [QUANT_CFG]`` (Megatron-LM's quantize.py counterpart).

Loads the model, answers a few prompts, calibrates and quantizes with ModelOpt, prints the
quantization summary and the answers again, and saves a dist checkpoint (``MLM_MODEL_SAVE``)
with the ModelOpt state that every other script reloads at any TP/PP.
"""
from __future__ import annotations

import argparse
import time

import torch.distributed as dist

from post_training import arguments
from post_training.checkpointing import load_tokenizer, resolve_hf_dir, save_checkpoint, setup_model
from post_training.cli import run_entry, split_preflight
from post_training.cli.generate import stop_ids
from post_training.data import load_prompts, render_prompt
from post_training.generate import GenerateConfig, forward_step, generate
from post_training.quantize import (AUTO, KV_CACHE_CFGS, QuantizeConfig, auto_choices, auto_formats,
                                    auto_quantize, calibration_samples, forward_loop, quantize,
                                    resolve_quant_cfg)
from post_training.runtime import init_runtime, memory_report
from post_training.utils import UsageError, print_rank_0, rank


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--export-kv-cache-quant", default="none", choices=list(KV_CACHE_CFGS))
    g.add_argument("--calib-dataset", default="builtin",
                   help="'builtin' (offline text), a datasets hub name, or a jsonl/json/parquet/txt file")
    g.add_argument("--calib-dataset-split", default="train")
    g.add_argument("--calib-dataset-field", default=None,
                   help="text or chat-messages field (default: messages, conversations or text)")
    g.add_argument("--calib-size", type=int, default=32)
    g.add_argument("--calib-seq-length", type=int, default=512)
    g.add_argument("--auto-quantize-bits", type=float, default=None,
                   help="with --export-quant-cfg auto: effective weight bits the per-layer search must meet")
    g.add_argument("--auto-quantize-formats", default="FP8_DEFAULT_CFG,INT4_AWQ_CFG",
                   help="comma-separated candidate formats for auto (no quantization is always a candidate)")
    g.add_argument("--auto-quantize-method", default="gradient", choices=["gradient", "kl_div"])
    g.add_argument("--auto-quantize-score-size", type=int, default=16,
                   help="calibration samples used to score layer sensitivity")
    g.add_argument("--prompts-file", default=None, help="prompts answered before and after")
    g.add_argument("--max-new-tokens", type=int, default=48)


def _summary(model, rt) -> None:
    """ModelOpt's per-quantizer summary, one pipeline stage after the other (TP rank 0)."""
    import modelopt.torch.quantization as mtq

    for stage in range(rt.pp):
        if rt.pp_rank == stage and rt.tp_rank == 0:
            print(f"quantization summary (PP stage {stage}, TP rank 0 of {rt.tp}):", flush=True)
            mtq.print_quant_summary(model)
        if dist.is_initialized():
            dist.barrier()


def _print_choices(choices: dict[str, str], best: dict, budget: float) -> None:
    """One line per searched layer group and the totals: what auto-quantize decided."""
    from collections import Counter

    for layer, fmt in choices.items():
        print_rank_0(f"  auto-quantize: {layer:<55} {fmt}")
    counts = ", ".join(f"{n} {f}" for f, n in Counter(choices.values()).most_common())
    bits = best["constraints"].get("effective_bits")  # what the chosen formats add up to
    print_rank_0(f"auto-quantize: {counts}; effective bits {bits:.2f} (budget {budget:g}, "
                 f"{'met' if best['is_satisfied'] else 'NOT met'}); score {best['score']:.4g}")


def main(argv: list[str]) -> int:
    preflight, argv = split_preflight(argv)
    ns = arguments.parse(argv, add_quantize_args, prog="quantize")
    par, mcfg, src = arguments.common_configs(ns)
    qcfg = QuantizeConfig(quant_cfg=src.export_quant_cfg or "FP8_DEFAULT_CFG",
                          kv_cache_quant=ns.export_kv_cache_quant, calib_dataset=ns.calib_dataset,
                          calib_split=ns.calib_dataset_split, calib_field=ns.calib_dataset_field,
                          calib_size=ns.calib_size, calib_seq_length=ns.calib_seq_length,
                          auto_bits=ns.auto_quantize_bits, auto_formats=ns.auto_quantize_formats,
                          auto_method=ns.auto_quantize_method, auto_score_size=ns.auto_quantize_score_size)
    src.validate(par)
    quant_cfg = resolve_quant_cfg(qcfg.quant_cfg, qcfg.kv_cache_quant)
    if qcfg.quant_cfg == AUTO:
        auto_formats(qcfg)
        if par.pp > 1:
            raise UsageError("--export-quant-cfg auto needs PP=1: its sensitivity scores backpropagate "
                             "through the whole model in one stage (use TP to spread it)")
    prompts = load_prompts(ns.prompts_file)
    GenerateConfig(max_new_tokens=ns.max_new_tokens)
    if preflight:
        return 0
    rt = init_runtime(par)
    tok = load_tokenizer(resolve_hf_dir(src))
    samples = calibration_samples(qcfg, tok)  # bad calibration data fails before the model loads
    rendered = [render_prompt(p, tok) for p in prompts]
    # auto-quantize scores layers with gradients, so its model is not frozen
    model, tok, hf_config = setup_model(src, mcfg, rt, inference=qcfg.quant_cfg != AUTO)
    gcfg = GenerateConfig(max_new_tokens=ns.max_new_tokens, stop_token_ids=stop_ids(tok, hf_config))

    def answers() -> list[str]:
        return [tok.decode([t for t in generate(model, ids, gcfg) if t not in gcfg.stop_token_ids])
                for ids in rendered]

    import modelopt.torch.quantization as mtq

    before = answers()
    t0 = time.perf_counter()
    fwd = lambda m, x: forward_step(m, x, None)  # noqa: E731
    if qcfg.quant_cfg == AUTO:
        kv = quant_cfg if qcfg.kv_cache_quant != "none" else None
        model, state = auto_quantize(model, qcfg, samples, fwd, kv)
        model.requires_grad_(False)
        _print_choices(auto_choices(state), state["best"], qcfg.auto_bits)
    else:
        model = quantize(model, quant_cfg, forward_loop(samples, fwd, progress=rank() == 0))
    seconds = time.perf_counter() - t0
    _summary(model, rt)
    print_rank_0(f"quantized with {qcfg.quant_cfg} (KV cache: {qcfg.kv_cache_quant}) on "
                 f"{len(samples)} x {qcfg.calib_seq_length} calibration tokens in {seconds:.1f}s")
    if src.save:  # original weights + quantizer state: what export and reloads expect
        save_checkpoint(model, rt, src.save, None, hf_dir=resolve_hf_dir(src), model_conf=src.model_conf,
                        keep_last=src.keep_last)
    # Fake-quantizing every weight at every decode step is the slow part of CPU generation;
    # folding applies the weight quantizers once (same outputs) for the answers below.
    mtq.fold_weight(model)
    after = answers()
    for i, (p, a, b) in enumerate(zip(prompts, before, after)):
        print_rank_0(f"===== PROMPT {i} =====\n{p}\n----- before -----\n{a}\n----- after -----\n{b}\n"
                     f"===== END {i} =====")
    print_rank_0(memory_report("memory"))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
