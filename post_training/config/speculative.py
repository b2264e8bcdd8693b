"""Configs of speculative decoding: the drafter, the acceptance measurement on MT-Bench-style
prompts (answer length: ``osl`` here; sampling settings: GenerateConfig), and draft-head training."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from post_training.config.core import _check

__all__ = ["DraftConfig", "AcceptanceConfig", "DraftTrainConfig", "DRAFTERS", "MTBENCH_CATEGORIES",
           "BUILTIN_PROMPTS", "SPEC_ALGORITHMS"]

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


SPEC_ALGORITHMS = ("eagle3", "eagle1", "medusa")


@dataclass(kw_only=True)
class DraftTrainConfig:
    """Draft-head training (``scripts/eagle3.sh``): which head ModelOpt attaches to the frozen
    target and how it trains. Checks that need the target (vocabulary, layer count):
    :meth:`check_target`."""

    algorithm: str = "eagle3"  # eagle3 | eagle1 | medusa
    eagle_ttt_steps: int = 3  # train-time-test steps (ModelOpt's eagle_ttt_steps), loss weight 0.9^i
    draft_vocab_size: int | None = None  # EAGLE: draft lm_head over the N most frequent tokens (d2t)
    eagle_aux_layers: str | None = None  # EAGLE-3: comma-separated target layer ids; None: 1, L/2-1, L-4
    eagle_num_layers: int = 1  # EAGLE draft decoder layers
    eagle_config: str | None = None  # json of eagle_architecture_config overrides (Megatron-LM's flag)
    init_from_target: bool = False  # warm start: draft lm_head (and norm) from the target's; Medusa blocks zero
    medusa_num_heads: int = 2
    medusa_num_layers: int = 1  # residual blocks per Medusa head

    def __post_init__(self) -> None:
        _check([
            (self.algorithm in SPEC_ALGORITHMS,
             f"--algorithm must be one of {', '.join(SPEC_ALGORITHMS)} (got {self.algorithm!r})"),
            (self.eagle_ttt_steps >= 1, f"--eagle-ttt-steps must be >= 1 (got {self.eagle_ttt_steps})"),
            (self.draft_vocab_size is None or self.draft_vocab_size >= 1,
             f"--draft-vocab-size must be >= 1 (got {self.draft_vocab_size})"),
            (self.eagle_num_layers >= 1, f"--eagle-num-layers must be >= 1 (got {self.eagle_num_layers})"),
            (self.medusa_num_heads >= 1, f"--medusa-num-heads must be >= 1 (got {self.medusa_num_heads})"),
            (self.medusa_num_layers >= 1, f"--medusa-num-layers must be >= 1 (got {self.medusa_num_layers})"),
            (self.algorithm != "medusa" or self.draft_vocab_size is None,
             "--draft-vocab-size applies to EAGLE heads only (Medusa heads predict the full vocabulary)"),
            (self.algorithm == "eagle3" or self.eagle_aux_layers is None,
             "--eagle-aux-layers applies to --algorithm eagle3 only"),
            (self.eagle_config is None or Path(self.eagle_config).is_file(),
             f"--eagle-config file not found: {self.eagle_config}"),
        ])
        self.aux_layer_ids  # parse errors now

    @property
    def aux_layer_ids(self) -> list[int] | None:
        if self.eagle_aux_layers is None:
            return None
        try:
            ids = [int(x) for x in self.eagle_aux_layers.split(",") if x.strip()]
        except ValueError:
            ids = []
        _check([(bool(ids), f"--eagle-aux-layers must be comma-separated layer ids (got {self.eagle_aux_layers!r})")])
        return ids

    @property
    def is_eagle(self) -> bool:
        return self.algorithm.startswith("eagle")

    def check_target(self, num_layers: int, vocab_size: int) -> None:
        """The flags against the target model: one error line each."""
        ids = self.aux_layer_ids or []
        bad = [i for i in ids if not 0 <= i < num_layers]
        _check([
            (not bad, f"--eagle-aux-layers {','.join(map(str, bad))} out of range: the target has "
                      f"{num_layers} layers (ids 0..{num_layers - 1})"),
            (self.draft_vocab_size is None or self.draft_vocab_size <= vocab_size,
             f"--draft-vocab-size {self.draft_vocab_size} is larger than the target's vocabulary ({vocab_size})"),
        ])
