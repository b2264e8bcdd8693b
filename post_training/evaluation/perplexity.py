"""Perplexity of a model over token windows, correct at any TP/PP/DP (``scripts/evaluate.sh``).

The text is cut into consecutive non-overlapping ``seq_length``-token windows (no BOS added, the
tail that does not fill a window is dropped). Within a window token t is predicted from tokens
< t, so each window contributes ``seq_length - 1`` predicted tokens; the reported NLL is the mean
over all predicted tokens of all windows and the perplexity is ``exp`` of it.

Windows are split over data-parallel ranks; each pipeline runs them micro-batch by micro-batch
through :func:`post_training.generate.stage_forward`, the last stage turns the (TP-gathered,
full-vocab) logits into NLL sums, and the sums travel to every rank (pipeline broadcast, then a
data-parallel all-reduce), so all ranks return the same numbers.

Inputs (text, windows, questions) are read by :mod:`.inputs`; zero-shot multiple-choice accuracy
(MMLU format) is :mod:`.mmlu`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from post_training.config import EvalConfig
from post_training.inference import stage_forward
from post_training.runtime.collectives import last_stage_dp_sum

# Cross-entropy is taken over this many positions at a time: a [b, s, V] fp32 copy of 4096 x 49k
# logits is 0.8 GB per sequence, so slicing keeps the peak near the model's own output.
CE_SLICE = 1024


# ----------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    nll_sum: float  # summed over predicted tokens
    tokens: int  # predicted tokens
    chunks: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        try:
            return math.exp(self.nll)
        except OverflowError:
            return math.inf


def token_nll_sum(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Summed next-token NLL of ``tokens`` [b, s] under ``logits`` [b, s, V] (position t predicts
    t+1), in fp32 per slice and accumulated in fp64."""
    total = 0.0
    s = tokens.size(1)
    for start in range(0, s - 1, CE_SLICE):
        stop = min(start + CE_SLICE, s - 1)
        lg = logits[:, start:stop].float()
        tgt = tokens[:, start + 1:stop + 1]
        total += torch.nn.functional.cross_entropy(
            lg.reshape(-1, lg.size(-1)), tgt.reshape(-1), reduction="sum").double().item()
    return total


def dp_shard(n: int) -> range:
    """Indices (of ``n`` items) this data-parallel rank evaluates, round robin."""
    if not ps.model_parallel_is_initialized():
        return range(n)
    return range(ps.get_data_parallel_rank(), n, ps.get_data_parallel_world_size())


@torch.inference_mode()
def perplexity(model, windows: list[list[int]], micro_batch_size: int = 1,
               progress: bool = False) -> PerplexityResult:
    """Mean token NLL and perplexity of ``windows`` (equal-length token lists). Collective: every
    rank of the job calls it with the same windows and gets the same result. ``progress`` shows
    a progress bar (pass it on one rank)."""
    from tqdm import tqdm

    if not windows or len({len(w) for w in windows}) != 1 or len(windows[0]) < 2:
        raise ValueError("perplexity needs equal-length windows of at least 2 tokens")
    device = next(model.parameters()).device
    mine = [windows[i] for i in dp_shard(len(windows))]
    nll = 0.0
    for start in tqdm(range(0, len(mine), micro_batch_size), desc="evaluating", disable=not progress,
                      leave=False):
        tokens = torch.tensor(mine[start:start + micro_batch_size], dtype=torch.long, device=device)
        logits = stage_forward(model, tokens, None)
        if logits is not None:  # last stage
            nll += token_nll_sum(logits, tokens)
    sums = last_stage_dp_sum(torch.tensor([nll], dtype=torch.float64, device=device))
    seq = len(windows[0])
    return PerplexityResult(nll_sum=float(sums[0]), tokens=len(windows) * (seq - 1), chunks=len(windows))


# ----------------------------------------------------------------------------- the task


def evaluate_model(model, tokenizer, windows: list[list[int]] | None, questions, cfg: EvalConfig,
                   micro_batch_size: int) -> dict:
    """Perplexity of ``windows`` (None: skipped) and accuracy on ``questions``, printed and
    returned as the report evaluate.sh writes with --json-out. Collective."""
    import time

    from post_training.evaluation.mmlu import score
    from post_training.utils import print_rank_0, rank

    t0 = time.perf_counter()
    out: dict = {"source": cfg.source}
    if windows is not None:
        res = perplexity(model, windows, micro_batch_size, progress=rank() == 0)
        print_rank_0(f"{res.chunks} windows x {len(windows[0])} tokens ({res.tokens} predicted) from "
                     f"{cfg.source}: nll {res.nll:.6f}")
        out.update(perplexity=res.perplexity, nll=res.nll, tokens=res.tokens, chunks=res.chunks)
    if questions is not None:
        mc = score(model, questions, tokenizer, micro_batch_size)
        print_rank_0(f"mmlu accuracy {mc.accuracy:.4f} ({mc.correct}/{len(questions)}, "
                     f"zero-shot, {cfg.mmlu_path})")
        out.update(accuracy=mc.accuracy, mmlu={"path": cfg.mmlu_path, "correct": mc.correct,
                                               "total": len(mc.answers), "predictions": mc.predictions})
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
