"""Configs of speculative decoding: the drafter, and the acceptance measurement on MT-Bench-style
prompts (answer length: ``osl`` here; sampling settings: GenerateConfig)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from post_training.config.core import _check

__all__ = ["DraftConfig", "AcceptanceConfig", "DRAFTERS", "MTBENCH_CATEGORIES", "BUILTIN_PROMPTS"]

DRAFTERS = ("none", "ngram", "model", "eagle", "medusa")
MTBENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                      "humanities")
BUILTIN_PROMPTS = "builtin"  # the project's own prompt set in MT-Bench's categories


@dataclass(kw_only=True)
class DraftConfig:
    """Who proposes the draft tokens the target verifies."""

    draft: str = "none"  # none | ngram | model | eagle | medusa
    draft_steps: int = 3  # tokens drafted per target step (K)
    ngram_size: int = 3  # ngram: longest suffix matched in the context (falls back to shorter)
    draft_model_path: str | None = None  # model: an HF directory of the same tokenizer
    draft_load: str | None = None  # model / eagle / medusa: a dist checkpoint of the draft

    def __post_init__(self) -> None:
        _check([
            (self.draft in DRAFTERS, f"--draft must be one of {', '.join(DRAFTERS)} (got {self.draft!r})"),
            (self.draft_steps >= 1, f"--draft-steps must be >= 1 (got {self.draft_steps})"),
            (self.ngram_size >= 1, f"--ngram-size must be >= 1 (got {self.ngram_size})"),
            (self.draft != "model" or self.draft_model_path or self.draft_load,
             "--draft model needs --draft-model-path (HF directory) or --draft-load (checkpoint)"),
            (self.draft_model_path is None or Path(self.draft_model_path).is_dir(),
             f"draft model directory not found: {self.draft_model_path}"),
            (self.draft_load is None or Path(self.draft_load).exists(),
             f"draft checkpoint not found: {self.draft_load}"),
        ])

    @property
    def enabled(self) -> bool:
        return self.draft != "none"


@dataclass(kw_only=True)
class AcceptanceConfig:
    """Acceptance-length measurement (Megatron-LM's validate / ModelOpt's ar_validate)."""

    mtbench_path: str = BUILTIN_PROMPTS  # builtin | FastChat question.jsonl | hub-format rows | hub name
    categories: str | None = None  # comma-separated filter
    num_prompts: int | None = None  # per category; None: all
    osl: int = 64  # answer tokens per turn
    turns: int = 1  # 1: first turns; 2: second turn after the model's own first answer
    plot: str | None = None  # PNG bar chart; default beside --json-out

    def __post_init__(self) -> None:
        unknown = [c for c in self.category_list if c not in MTBENCH_CATEGORIES]
        _check([
            (not unknown, f"unknown category {', '.join(unknown)} (known: {', '.join(MTBENCH_CATEGORIES)})"),
            (self.num_prompts is None or self.num_prompts >= 1, "--num-prompts must be >= 1"),
            (self.osl >= 1, f"--osl must be >= 1 (got {self.osl})"),
            (self.turns in (1, 2), f"--turns must be 1 or 2 (got {self.turns})"),
            (self.plot is None or Path(self.plot).resolve().parent.is_dir(),
             f"--plot directory does not exist: {Path(self.plot or '.').parent}"),
        ])

    @property
    def category_list(self) -> list[str]:
        return [c.strip() for c in (self.categories or "").split(",") if c.strip()]
