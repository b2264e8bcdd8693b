"""Perplexity of a model over token windows, correct at any TP/PP/DP (``scripts/evaluate.sh``).

The text is cut into consecutive non-overlapping ``seq_length``-token windows (no BOS added, the
tail that does not fill a window is dropped). Within a window token t is predicted from tokens
< t, so each window contributes ``seq_length - 1`` predicted tokens; the reported NLL is the mean
over all predicted tokens of all windows and the perplexity is ``exp`` of it.

Windows are split over data-parallel ranks; each pipeline runs them micro-batch by micro-batch
through :func:`post_training.generate.forward_step`, the last stage turns the (TP-gathered,
full-vocab) logits into NLL sums, and the sums travel to every rank (pipeline broadcast, then a
data-parallel all-reduce), so all ranks return the same numbers.

Zero-shot multiple-choice accuracy (MMLU format) lives in :mod:`post_training.multiple_choice`.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from post_training.data import builtin_text, token_chunks
from post_training.generate import forward_step
from post_training.utils import UsageError

# Local --eval-dataset files: suffix -> datasets builder.
DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
                    ".text": "text", ".csv": "csv"}
# Cross-entropy is taken over this many positions at a time: a [b, s, V] fp32 copy of 4096 x 49k
# logits is 0.8 GB per sequence, so slicing keeps the peak near the model's own output.
CE_SLICE = 1024


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate. Flags: --seq-length, --micro-batch-size, --eval-text-path,
    --eval-dataset, --eval-dataset-split, --eval-dataset-field, --eval-max-chunks, --mmlu-path,
    --json-out. With neither a text file nor a dataset the built-in offline eval text is used."""

    seq_length: int = 4096
    micro_batch_size: int = 1
    max_chunks: int | None = None
    text_path: str | None = None
    dataset: str | None = None
    dataset_split: str = "test"
    dataset_field: str = "text"
    mmlu_path: str | None = None
    json_out: str | None = None

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise UsageError(f"--seq-length must be >= 2 to predict a token (got {self.seq_length})")
        if self.micro_batch_size < 1:
            raise UsageError(f"--micro-batch-size must be >= 1 (got {self.micro_batch_size})")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise UsageError(f"--eval-max-chunks must be >= 1 (got {self.max_chunks})")
        if self.text_path and self.dataset:
            raise UsageError("give --eval-text-path or --eval-dataset, not both")
        if self.text_path is not None and not Path(self.text_path).is_file():
            raise UsageError(f"eval text file not found: {self.text_path}")
        if self.mmlu_path is not None and not Path(self.mmlu_path).is_file():
            raise UsageError(f"MMLU file not found: {self.mmlu_path}")
        if self.json_out is not None and not Path(self.json_out).resolve().parent.is_dir():
            raise UsageError(f"--json-out directory does not exist: {Path(self.json_out).parent}")

    @property
    def source(self) -> str:
        """Where the text comes from, for reports."""
        if self.text_path:
            return f"file:{self.text_path}"
        if self.dataset:
            return f"dataset:{self.dataset}[{self.dataset_split}].{self.dataset_field}"
        return "builtin:eval"


# ----------------------------------------------------------------------------- text sources


def _read_text_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"eval text file {path} is not UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"eval text file {path} is empty")
    return text


def _load_dataset(cfg: EvalConfig):
    """A local file (by suffix), a local dataset directory, or a hub name, through ``datasets``.
    A local file is registered under the requested split, so any split name works for it."""
    import datasets

    p = Path(cfg.dataset)
    if p.is_file():
        builder = DATASET_BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise UsageError(f"--eval-dataset {p}: unknown file type {p.suffix!r}; "
                             f"use one of {', '.join(sorted(DATASET_BUILDERS))}")
        if p.stat().st_size == 0:
            raise UsageError(f"--eval-dataset {p} is empty")
        return datasets.load_dataset(builder, data_files={cfg.dataset_split: str(p)},
                                     split=cfg.dataset_split)
    return datasets.load_dataset(str(p) if p.is_dir() else cfg.dataset, split=cfg.dataset_split)


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs each retry of an unreachable hub as a warning; the failure itself
    becomes our one-line error, so the retries are not shown."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _dataset_text(cfg: EvalConfig) -> str:
    try:
        with _quiet_hub():
            ds = _load_dataset(cfg)
    except UsageError:
        raise
    except Exception as e:  # datasets raises many types, often with multi-line messages
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"cannot load --eval-dataset {cfg.dataset!r} split {cfg.dataset_split!r}: "
                         f"{msg[:300]}") from None
    if cfg.dataset_field not in ds.column_names:
        raise UsageError(f"--eval-dataset {cfg.dataset!r} has no field {cfg.dataset_field!r} "
                         f"(--eval-dataset-field); fields: {', '.join(ds.column_names)}")
    rows = [r for r in ds[cfg.dataset_field] if r is not None]
    if not all(isinstance(r, str) for r in rows):
        raise UsageError(f"--eval-dataset field {cfg.dataset_field!r} is not text")
    # Rows joined by a blank line, as in the usual wikitext perplexity recipe.
    text = "\n\n".join(r for r in rows if r.strip())
    if not text:
        raise UsageError(f"--eval-dataset {cfg.dataset!r} field {cfg.dataset_field!r} has no text")
    return text


def load_eval_text(cfg: EvalConfig) -> str:
    """The text to evaluate: --eval-text-path, --eval-dataset, or the built-in eval split."""
    if cfg.text_path:
        return _read_text_file(cfg.text_path)
    if cfg.dataset:
        return _dataset_text(cfg)
    return builtin_text("eval")


def eval_windows(text: str, tokenizer, cfg: EvalConfig) -> list[list[int]]:
    """The token windows to evaluate; a text shorter than one window is a usage error (checked
    before the model loads, so ``--preflight`` catches it)."""
    windows = token_chunks(text, tokenizer, cfg.seq_length, cfg.max_chunks)
    if not windows:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        raise UsageError(f"eval text from {cfg.source} has {n} tokens, fewer than one "
                         f"--seq-length window of {cfg.seq_length}")
    return windows


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


def agree(values: torch.Tensor) -> torch.Tensor:
    """Make every rank hold the sum over data-parallel ranks of the last stage's ``values``:
    broadcast over the pipeline group, then all-reduce over the data-parallel group."""
    if not dist.is_initialized():
        return values
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(values, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=ps.get_data_parallel_group())
    return values


@torch.inference_mode()
def perplexity(model, windows: list[list[int]], micro_batch_size: int = 1) -> PerplexityResult:
    """Mean token NLL and perplexity of ``windows`` (equal-length token lists). Collective: every
    rank of the job calls it with the same windows and gets the same result."""
    if not windows or len({len(w) for w in windows}) != 1 or len(windows[0]) < 2:
        raise ValueError("perplexity needs equal-length windows of at least 2 tokens")
    device = next(model.parameters()).device
    mine = [windows[i] for i in dp_shard(len(windows))]
    nll = 0.0
    for start in range(0, len(mine), micro_batch_size):
        tokens = torch.tensor(mine[start:start + micro_batch_size], dtype=torch.long, device=device)
        logits = forward_step(model, tokens, None)
        if logits is not None:  # last stage
            nll += token_nll_sum(logits, tokens)
    sums = agree(torch.tensor([nll], dtype=torch.float64, device=device))
    seq = len(windows[0])
    return PerplexityResult(nll_sum=float(sums[0]), tokens=len(windows) * (seq - 1), chunks=len(windows))
