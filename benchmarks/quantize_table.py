"""PTQ quality table: every format through the toolkit (megatron-core model) and through
ModelOpt's own Hugging Face path (``mtq.quantize`` on the transformers model), same calibration
samples and the same evaluation windows, side by side in one process.

    .venv/bin/python benchmarks/quantize_table.py [--formats FP8_DEFAULT_CFG,INT8_SMOOTHQUANT_CFG,...]
        [--calib-size 16] [--calib-seq-length 512] [--eval-windows 16] [--seq-length 512]
        [--calib-dataset builtin|FILE] [--auto-quantize-bits 6] [--no-hf] [--json-out F]

A format is a ModelOpt config name, a recipe file (examples/quantization/*.yaml; recipes name
layers with patterns such as ``*layers.0.*`` that match both model's module names), or
``auto`` (mtq.auto_quantize over --auto-quantize-formats under --auto-quantize-bits).
Prints one row per format: perplexity, delta vs the unquantized model, quantize seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)

DEFAULT_FORMATS = ("FP8_DEFAULT_CFG,INT8_SMOOTHQUANT_CFG,examples/quantization/int8_sq_fc2_act16.yaml,"
                   "INT4_AWQ_CFG,NVFP4_DEFAULT_CFG,auto")


def hf_perplexity(model, windows: list[list[int]]) -> float:
    import torch

    from post_training.evaluation.perplexity import token_nll_sum

    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            nll += token_nll_sum(model(ids).logits, ids)
            n += len(w) - 1
    return math.exp(nll / n)


def fuse_like_serving(model) -> None:
    """The HF model as a serving engine runs it: q/k/v and gate/up are one fused GEMM each, so
    they share one smoothing vector (ModelOpt's export averages them) and one per-tensor weight
    scale (vLLM / TensorRT-LLM requantize fused FP8 weights with the largest of the scales).
    The megatron model has these layers fused from the start, so this is the like-for-like
    number; per-channel and per-block scales cover disjoint rows and are left alone."""
    import torch
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    requantize_resmooth_fused_llm_layers(model)
    for layer in model.model.layers:
        for group in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                      (layer.mlp.gate_proj, layer.mlp.up_proj)):
            quantizers = [m.weight_quantizer for m in group]
            amax = [q.amax for q in quantizers if q.is_enabled and q.amax is not None]
            if len(amax) == len(group) and all(a.numel() == 1 for a in amax):
                shared = torch.stack([a.reshape(()) for a in amax]).max()
                for q in quantizers:
                    q.amax = shared.clone().reshape(q.amax.shape)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=DEFAULT_FORMATS)
    ap.add_argument("--calib-dataset", default="builtin")
    ap.add_argument("--calib-size", type=int, default=16)
    ap.add_argument("--calib-seq-length", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=512)
    ap.add_argument("--auto-quantize-bits", type=float, default=6.0)
    ap.add_argument("--auto-quantize-formats", default="FP8_DEFAULT_CFG,INT4_AWQ_CFG")
    ap.add_argument("--no-hf", action="store_true", help="skip ModelOpt's HF path column")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoModelForCausalLM

    from post_training.config import SourceConfig
    from post_training.hf import load_tokenizer, source_hf_dir
    from post_training.model_builder import setup_model
    from post_training.data import builtin_text, token_chunks
    from post_training.evaluation.perplexity import perplexity
    from post_training.inference import stage_forward
    from post_training.config import ModelConfig
    from post_training.config import AUTO
    from post_training.quantization.calibration import calibration_samples, forward_loop
    from post_training.quantization.ptq import auto_quantize, next_token_loss
    from post_training.quantization.recipes import auto_formats, resolve_quant_cfg
    from post_training.config import CalibConfig, QuantizeConfig
    from post_training.runtime import ParallelConfig, init_runtime

    rt = init_runtime(ParallelConfig())
    src = SourceConfig()
    hf_dir = source_hf_dir(src)
    tok = load_tokenizer(hf_dir)
    base_q = dict(calib_dataset=a.calib_dataset, calib_size=a.calib_size, calib_seq_length=a.calib_seq_length)
    samples = calibration_samples(CalibConfig(**base_q), tok)
    windows = token_chunks(builtin_text("eval"), tok, a.seq_length, a.eval_windows)
    print(f"calibration: {len(samples)} x {a.calib_seq_length} tokens ({a.calib_dataset}); "
          f"eval: {len(windows)} x {a.seq_length} tokens (built-in eval split)", flush=True)

    def ours(fmt: str | None) -> tuple[float, float]:
        # auto-quantize backpropagates for its scores; everything else runs on frozen weights
        model, _, _ = setup_model(src, ModelConfig(), rt, inference=fmt != AUTO)
        fwd = lambda m, x: stage_forward(m, x, None)  # noqa: E731
        t0 = time.perf_counter()
        if fmt == AUTO:
            q = QuantizeConfig(quant_cfg=AUTO, auto_bits=a.auto_quantize_bits,
                               auto_formats=a.auto_quantize_formats)
            model, _ = auto_quantize(model, q, samples, fwd, None)
            model.requires_grad_(False)
        elif fmt is not None:
            mtq.quantize(model, resolve_quant_cfg(fmt), forward_loop(samples, fwd, progress=False))
        secs = time.perf_counter() - t0
        return perplexity(model, windows).perplexity, secs

    def theirs(fmt: str | None) -> tuple[float, float, float]:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        batches = [torch.tensor([s]) for s in samples]

        def loop(m) -> None:
            with torch.no_grad():
                for b in batches:
                    m(b)

        t0 = time.perf_counter()
        if fmt == AUTO:
            q = QuantizeConfig(quant_cfg=AUTO, auto_bits=a.auto_quantize_bits,
                               auto_formats=a.auto_quantize_formats)
            model, _ = mtq.auto_quantize(
                model, constraints={"effective_bits": q.auto_bits}, quantization_formats=auto_formats(q),
                data_loader=batches, forward_step=lambda m, b: m(b).logits,
                loss_func=lambda out, b: next_token_loss(out, b), num_calib_steps=len(batches),
                num_score_steps=min(q.auto_score_size, len(batches)))
        elif fmt is not None:
            mtq.quantize(model, resolve_quant_cfg(fmt), loop)
        secs = time.perf_counter() - t0
        ppl = hf_perplexity(model, windows)
        if fmt is None:
            return ppl, secs, ppl
        with torch.no_grad():
            fuse_like_serving(model)
        return ppl, secs, hf_perplexity(model, windows)

    rows = []
    formats = [None] + [f.strip() for f in a.formats.split(",") if f.strip()]
    for fmt in formats:
        row = {"format": fmt or "unquantized"}
        row["ppl"], row["seconds"] = ours(fmt)
        if not a.no_hf:
            row["hf_ppl"], row["hf_seconds"], row["hf_exported_ppl"] = theirs(fmt)
        rows.append(row)
        print(json.dumps(row), flush=True)

    base, hf_base = rows[0]["ppl"], rows[0].get("hf_ppl")
    print("\n| format | toolkit ppl | delta | quantize s | ModelOpt HF path ppl | delta | quantize s "
          "| HF path, fused as served | delta |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = 100 * (r["ppl"] / base - 1)
        hf = (f"{r['hf_ppl']:.3f} | {100 * (r['hf_ppl'] / hf_base - 1):+.1f}% | {r['hf_seconds']:.0f} | "
              f"{r['hf_exported_ppl']:.3f} | {100 * (r['hf_exported_ppl'] / hf_base - 1):+.1f}%"
              if "hf_ppl" in r else "- | - | - | - | -")
        print(f"| {Path(r['format']).name} | {r['ppl']:.3f} | {d:+.1f}% | {r['seconds']:.0f} | {hf} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
