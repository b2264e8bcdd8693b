"""Configs of the training recipes: the loop (logging, eval, save, resume), SFT / chat data,
data synthesis, distillation and pruning. Optimizer and schedule: :class:`TrainConfig`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from post_training.config.core import BUILTIN_CHAT, _check
from post_training.utils import UsageError

__all__ = ["LoopConfig", "SFTDataConfig", "SynthConfig", "DistillConfig", "PruneConfig",
           "PRUNE_KEYS", "KD_CKPT_FORMATS"]

PRUNE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups")
KD_CKPT_FORMATS = ("auto", "torch_dist", "hf")


@dataclass(kw_only=True)
class LoopConfig:
    """What the training loop does around each step: logging, evaluation, saving, resuming."""

    log_interval: int = 1  # iterations between log lines
    eval_interval: int = 0  # iterations between evaluations on the validation split (0: never)
    eval_iters: int = 1  # global batches per evaluation
    save_interval: int = 0  # iterations between checkpoints (0: only at the end; needs --save)
    log_file: str | None = None  # jsonl, one record per logged iteration and evaluation
    plot: bool = True  # write <save or log-file dir>/loss_curves.png at the end
    no_load_optim: bool = False  # with --load: weights, schedule and data position, fresh optimizer
    no_load_rng: bool = False  # with --load: do not restore the RNG states
    finetune: bool = False  # with --load: weights only, iteration 0 (Megatron's --finetune)
    progress: bool = True  # a progress bar on rank 0 (off when the output is not a terminal)
    lora_rank: int = 0  # > 0: train ModelOpt LoRA adapters of this rank, base weights frozen

    def __post_init__(self) -> None:
        _check([
            (self.log_interval >= 1, f"--log-interval must be >= 1 (got {self.log_interval})"),
            (self.eval_interval >= 0, f"--eval-interval must be >= 0 (got {self.eval_interval})"),
            (self.eval_iters >= 1, f"--eval-iters must be >= 1 (got {self.eval_iters})"),
            (self.save_interval >= 0, f"--save-interval must be >= 0 (got {self.save_interval})"),
            (self.lora_rank >= 0, f"--lora-rank must be >= 0 (got {self.lora_rank})"),
            (self.log_file is None or Path(self.log_file).resolve().parent.is_dir(),
             f"--log-file directory does not exist: {Path(self.log_file or '.').parent}"),
        ])


@dataclass(kw_only=True)
class SFTDataConfig:
    """Chat / SFT training data (the sequence length is ModelConfig.seq_length)."""

    hf_dataset: str | None = None  # datasets hub name (online); None: data_files or the built-in chats
    data_files: str | None = None  # comma-separated local jsonl/json/parquet files
    data_split: str = "train"
    field: str | None = None  # messages / conversations / prompt+response; None: detect
    all_tokens: bool = False  # loss on every token, not only the assistant's
    pack: bool = True  # pack several conversations into one sequence
    reset_position_ids: bool = False  # packed: positions restart at each document
    reset_attention_mask: bool = False  # packed: a document attends only to itself
    valid_fraction: float = 0.05  # share of conversations held out for --eval-interval

    def __post_init__(self) -> None:
        _check([
            (not (self.hf_dataset and self.data_files),
             "give --finetune-hf-dataset or --finetune-data-files, not both"),
            (0.0 <= self.valid_fraction < 1.0,
             f"--finetune-valid-fraction must be in [0, 1) (got {self.valid_fraction})"),
        ])
        for f in self.files:
            if f != BUILTIN_CHAT and not Path(f).exists():
                raise UsageError(f"training data file not found: {f}")

    @property
    def files(self) -> list[str]:
        return [f.strip() for f in (self.data_files or "").split(",") if f.strip()]

    @property
    def source(self) -> str:
        """What the data is, for logs and reports."""
        return self.hf_dataset or self.data_files or BUILTIN_CHAT


@dataclass(kw_only=True)
class SynthConfig:
    """Magpie-style self-synthesis of chat data (answer sampling: GenerateConfig)."""

    output: str | None = None  # jsonl of {"messages": [...]}
    num_conversations: int = 64
    num_turns: int = 1  # user/assistant exchanges per conversation
    batch_size: int = 16  # sequences generated together through one KV cache
    topics_file: str | None = None  # one seed topic a line: the user turn starts from it
    question_temperature: float = 1.0  # sampling of the user turn
    question_top_p: float = 0.95
    max_question_tokens: int = 64

    def __post_init__(self) -> None:
        _check([
            (self.num_conversations >= 1, "--num-conversations must be >= 1"),
            (self.num_turns >= 1, "--num-turns must be >= 1"),
            (self.batch_size >= 1, "--synth-batch-size must be >= 1"),
            (self.question_temperature > 0, "--question-temperature must be > 0 (the user turn is sampled)"),
            (0 < self.question_top_p <= 1, "--question-top-p must be in (0, 1]"),
            (self.max_question_tokens >= 4, "--max-question-tokens must be >= 4"),
            (self.topics_file is None or Path(self.topics_file).is_file(),
             f"topics file not found: {self.topics_file}"),
            (self.output is None or Path(self.output).resolve().parent.is_dir(),
             f"--output directory does not exist: {Path(self.output or '.').parent}"),
        ])


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation: the teacher and the KD recipe (Megatron-LM's --export-kd-*)."""

    teacher_load: str | None = None  # dist checkpoint or HF directory; None: no distillation
    teacher_model_config: str | None = None  # yaml of overrides / a conf; default <teacher>/model_config.yaml
    teacher_ckpt_format: str = "auto"
    kd_cfg: str | None = None  # yaml in Megatron-LM's schema; None: logits KL only
    truncate_vocab: bool = False  # padded vocabularies of one tokenizer: KL over the common prefix

    def __post_init__(self) -> None:
        _check([
            (self.teacher_ckpt_format in KD_CKPT_FORMATS,
             f"--export-kd-teacher-ckpt-format must be one of {', '.join(KD_CKPT_FORMATS)}"),
            (self.teacher_load is None or Path(self.teacher_load).exists(),
             f"teacher checkpoint not found: {self.teacher_load}"),
            (self.kd_cfg is None or Path(self.kd_cfg).is_file(), f"--export-kd-cfg file not found: {self.kd_cfg}"),
            (self.teacher_model_config is None or self.teacher_load is not None,
             "--export-kd-teacher-model-config needs --export-kd-teacher-load"),
            (self.kd_cfg is None or self.teacher_load is not None, "--export-kd-cfg needs --export-kd-teacher-load"),
        ])

    @property
    def enabled(self) -> bool:
        return self.teacher_load is not None


@dataclass(kw_only=True)
class PruneConfig:
    """Minitron pruning targets (calibration data: CalibConfig)."""

    export_config: str = "{}"  # json: {"num_layers": 15, "ffn_hidden_size": 1024, ...}
    ppl_windows: int = 4  # 512-token windows of the built-in eval text scored before and after

    def __post_init__(self) -> None:
        if self.ppl_windows < 0:
            raise UsageError(f"--prune-ppl-windows must be >= 0 (got {self.ppl_windows})")
        targets = self.targets
        unknown = sorted(set(targets) - set(PRUNE_KEYS))
        _check([
            (bool(targets), "--prune-export-config names no target (e.g. '{\"num_layers\": 15}')"),
            (not unknown, f"--prune-export-config: unknown key {', '.join(unknown)} "
                          f"(known: {', '.join(PRUNE_KEYS)})"),
            (all(isinstance(v, int) and v >= 1 for v in targets.values()),
             "--prune-export-config values must be positive integers"),
        ])

    @property
    def targets(self) -> dict:
        try:
            value = json.loads(self.export_config)
        except json.JSONDecodeError as e:
            raise UsageError(f"--prune-export-config is not json: {e}") from None
        if not isinstance(value, dict):
            raise UsageError("--prune-export-config must be a json object")
        return value
