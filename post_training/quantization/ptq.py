"""Post-training quantization with ModelOpt on the megatron-core model: calibrate and quantize
(a named format or recipe, or ``auto``: a per-layer format search), and the PTQ task that
``scripts/quantize.sh`` runs (answers before and after, checkpoint with the ModelOpt state).
Formats live in :mod:`.recipes`, calibration data in :mod:`.calibration`."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from post_training.config import AUTO, GenerateConfig, QuantizeConfig
from post_training.generate import generate
from post_training.inference import stage_forward
from post_training.quantization.calibration import forward_loop
from post_training.quantization.recipes import auto_formats, resolve_quant_cfg
from post_training.runtime import Runtime
from post_training.runtime.collectives import gather_objects
from post_training.utils import print_rank_0, rank


def quantize(model, cfg: dict[str, Any], loop: Callable[[Any], None]):
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, cfg, loop)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next token: the loss whose gradients score layer sensitivity."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def auto_quantize(model, qcfg: QuantizeConfig, samples: list[list[int]],
                  forward: Callable[[Any, torch.Tensor], Any], kv_cfg: dict[str, Any] | None) -> tuple[Any, dict]:
    """Search a format per layer (or none) under an effective-bits budget with ModelOpt's
    ``auto_quantize``, then quantize the KV cache on top when asked. The model must not be frozen:
    the default ``gradient`` method scores layers by backpropagating the loss."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device
    batches = [torch.tensor([ids], device=device) for ids in samples]
    model, state = mtq.auto_quantize(
        model, constraints={"effective_bits": qcfg.auto_bits}, quantization_formats=auto_formats(qcfg),
        data_loader=batches, forward_step=forward, loss_func=lambda out, batch: next_token_loss(out, batch),
        num_calib_steps=len(batches), num_score_steps=min(qcfg.auto_score_size, len(batches)),
        method=qcfg.auto_method)
    if kv_cfg is not None:
        mtq.set_quantizer_by_cfg(model, kv_cfg["quant_cfg"])
        _calibrate_only(model, "_bmm_quantizer", forward_loop(samples, forward, progress=False))
    return model, state


def _calibrate_only(model, suffix: str, loop: Callable[[Any], None]) -> None:
    """Max-calibrate the enabled quantizers whose name ends with ``suffix`` while every other
    quantizer keeps quantizing with its searched scales (``mtq.calibrate`` would redo them all)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    chosen = [m for n, m in model.named_modules()
              if isinstance(m, TensorQuantizer) and n.endswith(suffix) and m.is_enabled]
    for q in chosen:
        q.disable_quant()
        q.enable_calib()
    loop(model)
    for q in chosen:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()


def auto_choices(state: dict) -> dict[str, str]:
    """Layer -> chosen format name, from auto_quantize's search state."""
    out = {}
    for key, recipe in state["best"]["recipe"].items():
        name = str(recipe).split("(")[0]
        out[key.removesuffix(".quant_recipe")] = name
    return out


def _stage_logits(model, tokens: torch.Tensor):
    return stage_forward(model, tokens, None)


def _print_choices(choices: dict[str, str], best: dict, budget: float) -> None:
    """One line per searched layer group and the totals: what auto-quantize decided."""
    for layer, fmt in choices.items():
        print_rank_0(f"  auto-quantize: {layer:<55} {fmt}")
    counts = ", ".join(f"{n} {f}" for f, n in Counter(choices.values()).most_common())
    bits = best["constraints"].get("effective_bits")  # what the chosen formats add up to
    print_rank_0(f"auto-quantize: {counts}; effective bits {bits:.2f} (budget {budget:g}, "
                 f"{'met' if best['is_satisfied'] else 'NOT met'}); score {best['score']:.4g}")


def calibrate_and_quantize(model, qcfg: QuantizeConfig, samples: list[list[int]]):
    """Quantize ``model`` as ``qcfg`` says, calibrating on ``samples``; returns the model.
    ``auto`` needs a model that is not frozen (its default method backpropagates) and leaves it
    frozen afterwards."""
    quant_cfg = resolve_quant_cfg(qcfg.quant_cfg, qcfg.kv_cache_quant)
    if qcfg.quant_cfg == AUTO:
        kv = quant_cfg if qcfg.kv_cache_quant != "none" else None
        model, state = auto_quantize(model, qcfg, samples, _stage_logits, kv)
        model.requires_grad_(False)
        _print_choices(auto_choices(state), state["best"], qcfg.auto_bits)
        return model
    return quantize(model, quant_cfg, forward_loop(samples, _stage_logits, progress=rank() == 0))


def print_quant_summary(model, rt: Runtime, verbose: bool = False) -> None:
    """The condensed summary (rank 0), or with ``verbose`` ModelOpt's per-quantizer table, one
    pipeline stage after the other (TP rank 0). Collective."""
    import torch.distributed as dist

    from post_training.quantization.report import full_table, model_summary_lines

    if not verbose:
        print_rank_0("\n".join(model_summary_lines(model)))
        return
    for stage in range(rt.pp):
        if rt.pp_rank == stage and rt.tp_rank == 0:
            print(f"quantization summary (PP stage {stage}, TP rank 0 of {rt.tp}):", flush=True)
            print(full_table(model), end="", flush=True)
        if dist.is_initialized():
            dist.barrier()


@dataclass
class PTQResult:
    model: Any
    seconds: float  # calibration and quantization
    before: list[str]  # answers to the prompts before quantization
    after: list[str]  # and after
    ppl_before: float | None = None  # perplexity on the built-in eval windows (None: not measured)
    ppl_after: float | None = None
    bytes_quantized: int = 0  # weights at their target formats, whole model
    bytes_plain: int = 0


def _model_weight_bytes(model, rt: Runtime) -> tuple[int, int]:
    """:func:`report.weight_bytes` summed over TP ranks and PP stages (one DP replica). Collective."""
    from post_training.quantization.report import weight_bytes

    mine = (rt.dp_rank, *weight_bytes(model))
    parts = [p for p in gather_objects(mine) if p[0] == 0]
    return sum(p[1] for p in parts), sum(p[2] for p in parts)


def run_ptq(model, tokenizer, qcfg: QuantizeConfig, samples: list[list[int]], prompts: list[list[int]],
            gcfg: GenerateConfig, rt: Runtime, save: Callable[[Any], None] | None = None,
            eval_windows: list[list[int]] | None = None, verbose: bool = False) -> PTQResult:
    """The PTQ task: answer ``prompts`` (token ids) and score ``eval_windows``, quantize, print
    the summary, ``save`` the quantized model (original weights + quantizer state: what export
    and reloads expect), then answer and score again. Collective."""
    import modelopt.torch.quantization as mtq

    from post_training.evaluation.perplexity import perplexity

    def answers() -> list[str]:
        return [tokenizer.decode([t for t in generate(model, ids, gcfg) if t not in gcfg.stop_token_ids])
                for ids in prompts]

    def ppl() -> float | None:
        return perplexity(model, eval_windows, progress=rank() == 0).perplexity if eval_windows else None

    before, ppl_before = answers(), ppl()
    t0 = time.perf_counter()
    model = calibrate_and_quantize(model, qcfg, samples)
    seconds = time.perf_counter() - t0
    print_quant_summary(model, rt, verbose)
    if save is not None:
        save(model)
    quantized, plain = _model_weight_bytes(model, rt)
    # Fake-quantizing every weight at every decode step is the slow part of CPU generation;
    # folding applies the weight quantizers once (same outputs) for the answers below.
    mtq.fold_weight(model)
    return PTQResult(model=model, seconds=seconds, before=before, after=answers(), ppl_before=ppl_before,
                     ppl_after=ppl(), bytes_quantized=quantized, bytes_plain=plain)
