"""The configs every task shares (runtime, model, source, batch, ...) and the PTQ / eval /
export / optimizer ones. See :mod:`post_training.config`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from post_training.utils import UsageError

EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
STRICTNESS = ("raise_all", "log_all")
KV_CACHE_FORMATS = ("none", "fp8", "fp8_affine", "nvfp4", "nvfp4_affine", "nvfp4_rotate")
AUTO = "auto"  # QuantizeConfig.quant_cfg: per-layer format search (mtq.auto_quantize)
AUTO_METHODS = ("gradient", "kl_div")
BUILTIN = "builtin"  # QuantizeConfig.calib_dataset: the built-in offline text (Python docs)
BUILTIN_CHAT = "builtin-chat"  # the built-in chat set (resources/chat_calibration.jsonl)
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
DEFAULT_SHARD_BYTES = 5 * 10**9  # 5GB, as huggingface_hub counts


def _check(rules: list[tuple[bool, str]]) -> None:
    for ok, msg in rules:
        if not ok:
            raise UsageError(msg)


@dataclass(kw_only=True)
class ParallelConfig:
    """Parallel layout, device and the one seed of a run."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234  # every generator of the run starts from it (PP stages offset, as Megatron)

    def __post_init__(self) -> None:
        _check([(self.tp >= 1 and self.pp >= 1, f"TP and PP must be >= 1 (got TP={self.tp}, PP={self.pp})"),
                (self.device in DEVICES, f"--device must be auto, cpu or cuda (got {self.device!r})")])


@dataclass(kw_only=True)
class ModelConfig:
    """How to build the model: dtype, positions, layer implementation, dropout."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16
    seq_length: int = 4096  # longest sequence the run feeds the model (generation, windows, training)
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    hidden_dropout: float = 0.0  # 0: post-training fine-tunes
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        _check([
            (self.dtype in DTYPE_NAMES, f"dtype must be one of {sorted(DTYPE_NAMES)} (got {self.dtype!r})"),
            (self.transformer_impl in TRANSFORMER_IMPLS, "--transformer-impl must be local or transformer_engine"),
            (self.seq_length >= 1, f"--seq-length must be >= 1 (got {self.seq_length})"),
            (0 <= self.hidden_dropout < 1 and 0 <= self.attention_dropout < 1,
             "--hidden-dropout and --attention-dropout must be in [0, 1)"),
        ])

    @property
    def torch_dtype(self):
        from post_training.io.formats import DTYPES  # torch: imported on use, not with the flags

        return DTYPES[self.dtype]


@dataclass(kw_only=True)
class SourceConfig:
    """Where the model comes from: a conf, an HF directory, or a checkpoint (and how strictly
    a checkpoint must match)."""

    model_conf: str = EMBEDDED_MODEL  # examples/conf/<org>/<model> name, or a yaml path
    pretrained_model_path: str | None = None  # a local HF model directory
    load: str | None = None  # a dist checkpoint (root or iteration dir) or an HF directory
    strictness: str = "raise_all"  # raise_all | log_all (load what matches, print the rest)
    verify_hashes: bool = True  # check shard sha256 against the checkpoint's record

    def __post_init__(self) -> None:
        _check([(self.strictness in STRICTNESS, f"--dist-ckpt-strictness must be one of {STRICTNESS}")])


@dataclass(kw_only=True)
class SaveConfig:
    """Where a task saves its dist checkpoint."""

    save: str | None = None
    keep_last: int | None = None  # after a save, delete all but the newest N iterations

    def __post_init__(self) -> None:
        _check([(self.keep_last is None or self.keep_last >= 1,
                 f"--keep-last-checkpoints must be >= 1 (got {self.keep_last})")])


@dataclass(kw_only=True)
class BatchConfig:
    """Batch shape: sequences per microbatch and per optimizer step (all DP ranks together)."""

    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None: micro_batch_size * DP (Megatron's default)

    def __post_init__(self) -> None:
        gbs = self.global_batch_size
        _check([
            (self.micro_batch_size >= 1, f"--micro-batch-size must be >= 1 (got {self.micro_batch_size})"),
            (gbs is None or (gbs >= 1 and gbs % self.micro_batch_size == 0),
             f"--global-batch-size ({gbs}) must be a positive multiple of "
             f"--micro-batch-size ({self.micro_batch_size})"),
        ])

    def global_size(self, dp: int) -> int:
        return self.micro_batch_size * dp if self.global_batch_size is None else self.global_batch_size

    def num_microbatches(self, dp: int) -> int:
        """Microbatches per DP rank per step (Megatron: gbs / (mbs * dp))."""
        gbs = self.global_size(dp)
        if gbs % (self.micro_batch_size * dp):
            raise UsageError(f"--global-batch-size ({gbs}) must be divisible by "
                             f"--micro-batch-size * DP ({self.micro_batch_size} * {dp})")
        return gbs // (self.micro_batch_size * dp)


@dataclass(kw_only=True)
class PromptConfig:
    """Prompts a task answers, and how they are rendered."""

    prompts_file: str | None = None  # json list, jsonl of chat messages, or text; None: built-in
    chat_template: bool = True  # render with the tokenizer's chat template (else raw text)


@dataclass(kw_only=True)
class ReportConfig:
    """Machine-readable output of a task."""

    json_out: str | None = None
    verbose: bool = False  # print upstream's full tables (e.g. ModelOpt's per-quantizer summary)

    def __post_init__(self) -> None:
        _check([(self.json_out is None or Path(self.json_out).resolve().parent.is_dir(),
                 f"--json-out directory does not exist: {Path(self.json_out or '.').parent}")])


@dataclass(kw_only=True)
class GenerateConfig:
    """Sampling settings (the seed is the run's, :class:`ParallelConfig`)."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: list[int] = field(default_factory=list)  # from the tokenizer, not a flag

    def __post_init__(self) -> None:
        _check([
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1 (got {self.max_new_tokens})"),
            (self.temperature >= 0, f"--temperature must be >= 0 (got {self.temperature})"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (got {self.top_p})"),
            (self.top_k >= 0, f"--top-k must be >= 0 (got {self.top_k})"),
        ])


@dataclass(kw_only=True)
class CalibConfig:
    """Calibration data: the samples a forward loop runs through the model (PTQ scales,
    auto-quantize scores, pruning importance)."""

    calib_dataset: str = BUILTIN  # builtin, builtin-chat, a datasets hub name, or a local file
    calib_split: str = "train"
    calib_field: str | None = None  # default: messages, conversations or text
    calib_size: int = 32  # samples of calib_seq_length tokens
    calib_seq_length: int = 512

    def __post_init__(self) -> None:
        _check([(self.calib_size >= 1 and self.calib_seq_length >= 2,
                 "--calib-size must be >= 1 and --calib-seq-length >= 2")])


@dataclass(kw_only=True)
class QuantizeConfig:
    """Post-training quantization: format, KV cache, auto-quantize search (data: CalibConfig)."""

    quant_cfg: str = "FP8_DEFAULT_CFG"  # a ModelOpt config name, a .yaml/.yml/.json recipe, or auto
    kv_cache_quant: str = "none"
    auto_bits: float | None = None  # effective weight bits the searched model must not exceed
    auto_formats: str = "FP8_DEFAULT_CFG,INT4_AWQ_CFG"  # candidates; "no quantization" is implied
    auto_method: str = "gradient"
    auto_score_size: int = 16  # samples used to score layer sensitivity (calibration uses all)
    ppl_windows: int = 8  # 512-token windows of the built-in eval text scored before and after

    def __post_init__(self) -> None:
        if self.quant_cfg == AUTO:
            _check([
                (self.auto_bits is not None, "--export-quant-cfg auto needs --auto-quantize-bits (e.g. 6.0)"),
                (self.auto_bits is None or 1.0 <= self.auto_bits <= 16.0,
                 f"--auto-quantize-bits must be in [1, 16] (got {self.auto_bits})"),
                (self.auto_method in AUTO_METHODS, f"--auto-quantize-method must be one of {', '.join(AUTO_METHODS)}"),
                (self.auto_score_size >= 1, "--auto-quantize-score-size must be >= 1"),
            ])
        elif self.auto_bits is not None:
            raise UsageError("--auto-quantize-bits only applies to --export-quant-cfg auto")
        _check([
            (self.kv_cache_quant in KV_CACHE_FORMATS,
             f"--export-kv-cache-quant must be one of {', '.join(KV_CACHE_FORMATS)} (got {self.kv_cache_quant!r})"),
            (self.ppl_windows >= 0, f"--ppl-windows must be >= 0 (got {self.ppl_windows})"),
        ])


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate (window length: ModelConfig.seq_length; batch: BatchConfig). With neither
    a text file nor a dataset the built-in offline eval text is used."""

    text_path: str | None = None  # a plain UTF-8 text file
    dataset: str | None = None  # datasets hub name (online) or a local file / dataset directory
    dataset_split: str = "test"
    dataset_field: str = "text"
    max_chunks: int | None = None  # evaluate at most N windows
    mmlu_path: str | None = None  # MMLU-format .csv/.jsonl: also zero-shot accuracy
    perplexity: bool = True  # False: MMLU accuracy alone (mmlu.sh)

    def __post_init__(self) -> None:
        _check([
            (self.perplexity or self.mmlu_path is not None,
             "--skip-perplexity leaves nothing to evaluate without --mmlu-path"),
            (self.max_chunks is None or self.max_chunks >= 1, f"--eval-max-chunks must be >= 1 (got {self.max_chunks})"),
            (not (self.text_path and self.dataset), "give --eval-text-path or --eval-dataset, not both"),
            (self.text_path is None or Path(self.text_path).is_file(), f"eval text file not found: {self.text_path}"),
            (self.mmlu_path is None or Path(self.mmlu_path).is_file(), f"MMLU file not found: {self.mmlu_path}"),
        ])

    @property
    def source(self) -> str:
        """Where the text comes from, for reports."""
        if self.text_path:
            return f"file:{self.text_path}"
        if self.dataset:
            return f"dataset:{self.dataset}[{self.dataset_split}].{self.dataset_field}"
        return "builtin:eval"


@dataclass(kw_only=True)
class ExportConfig:
    """Export destination and layout."""

    export_dir: str | None = None
    max_shard_size: int = DEFAULT_SHARD_BYTES  # bytes; larger exports get several shards + index
    dtype: str = "auto"  # dtype of the unquantized tensors; auto = the model's
    overwrite: bool = False  # replace a non-empty export dir

    def __post_init__(self) -> None:
        _check([
            (bool(self.export_dir), "export needs --export-dir (EXPORT_DIR): where to write the HF checkpoint"),
            (self.dtype == "auto" or self.dtype in DTYPE_NAMES, f"--export-dtype must be auto or one of {sorted(DTYPE_NAMES)}"),
            (self.max_shard_size >= 1, "--export-max-shard-size must be positive"),
        ])

    def validate(self, src: SourceConfig) -> None:
        """Cheap checks before any rank starts: refuse to clobber data or the model's source."""
        from post_training.io.atomic import check_output_dir

        out = check_output_dir(self.export_dir, self.overwrite, "export dir")
        for source in (src.pretrained_model_path, src.load):
            if source and Path(source).exists() and out.resolve() in (Path(source).resolve(),
                                                                      *Path(source).resolve().parents):
                raise UsageError(f"export dir {out} would replace the model's source {source}")

    def torch_dtype(self, model_dtype):
        """The dtype unquantized tensors are written in."""
        return model_dtype if self.dtype == "auto" else ModelConfig(dtype=self.dtype).torch_dtype


@dataclass(kw_only=True)
class TrainConfig:
    """Optimizer, learning-rate schedule and length of a training run (batch shape: BatchConfig,
    sequence length: ModelConfig, seed: ParallelConfig)."""

    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01  # not applied to biases and 1-D params (norms), as in Megatron
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping (and the norm report)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    train_iters: int = 1
    # --load of a run whose schedule flags differ (e.g. a longer --train-iters): megatron-core
    # refuses unless one of these says whose values win (Megatron-LM's flags)
    override_opt_param_scheduler: bool = False  # this run's flags
    use_checkpoint_opt_param_scheduler: bool = False  # the checkpoint's values

    def __post_init__(self) -> None:
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        _check([
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr] (got {self.min_lr})"),
            (self.lr_decay_style in LR_DECAY_STYLES,
             f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)} (got {self.lr_decay_style!r})"),
            (self.train_iters >= 1, f"--train-iters must be >= 1 (got {self.train_iters})"),
            (self.lr_decay_iters >= 1, f"--lr-decay-iters must be >= 1 (got {self.lr_decay_iters})"),
            (0 <= self.lr_warmup_iters < self.lr_decay_iters,
             f"--lr-warmup-iters must be in [0, lr-decay-iters) (got {self.lr_warmup_iters})"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})"),
            (self.clip_grad >= 0, f"--clip-grad must be >= 0 (got {self.clip_grad})"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"--adam-beta1/2 must be in [0, 1) (got {self.adam_beta1}, {self.adam_beta2})"),
            (self.adam_eps > 0, f"--adam-eps must be > 0 (got {self.adam_eps})"),
            (not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
             "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other"),
        ])
