"""The flag registry: Megatron-LM's flag names (and the scripts' environment variables) mapped
onto the typed configs of :mod:`post_training.config`.

Every flag is defined once, here, in the group of the config it fills; its default is that
config field's default (an entry point may override it, e.g. fewer answer tokens for quantize).
An entry point composes the groups it needs::

    args = arguments.parse(argv, ["runtime", "model", "source", "prompts", "generate"], prog="generate")
    args.runtime    # ParallelConfig
    args.generate   # GenerateConfig

A group name may name some of its fields (``"draft:draft_steps"``): only their flags are added.

A flag may name the environment variable the launch scripts read for it (``MLM_MODEL_SAVE`` for
``--save``, ...); a set variable is the flag's default, an explicit flag wins. Only entry points
import this module; the library receives the dataclasses.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

from post_training import config as C
from post_training.utils import UsageError


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets."""

    flag: str
    field: str
    help: str = ""
    env: str | None = None  # environment variable the launch scripts map onto it
    choices: Sequence[str] | None = None
    convert: Callable[[str], Any] | None = None  # string -> field value (default: the field's type)
    const: Any = None  # a store_const flag (--bf16 sets dtype = "bf16")
    negate: bool = False  # a switch that sets a bool field to False (--no-chat-template)
    mutex: str | None = None  # flags sharing a mutex name exclude each other


@dataclass(frozen=True)
class Group:
    cls: type
    title: str
    flags: tuple[Flag, ...]


def _size(text: str) -> int:
    from post_training.io.formats import parse_size

    return parse_size(text, "--export-max-shard-size")


GROUPS: dict[str, Group] = {
    "runtime": Group(C.ParallelConfig, "parallelism and device", (
        Flag("--tensor-model-parallel-size", "tp", "tensor-parallel size", env="TP"),
        Flag("--pipeline-model-parallel-size", "pp", "pipeline-parallel size", env="PP"),
        Flag("--device", "device", "auto: CUDA when available, else CPU", choices=C.DEVICES),
        Flag("--seed", "seed", "seed of every generator (sampling, dropout, data order)"),
    )),
    "model": Group(C.ModelConfig, "model", (
        Flag("--bf16", "dtype", "run in bfloat16", const="bf16", mutex="precision"),
        Flag("--fp16", "dtype", "run in float16", const="fp16", mutex="precision"),
        Flag("--seq-length", "seq_length", "longest sequence: prompt + answer, eval window, training sample"),
        Flag("--transformer-impl", "transformer_impl", "layer implementation (auto: TE on GPU when "
             "installed, else local)", choices=C.TRANSFORMER_IMPLS),
        Flag("--hidden-dropout", "hidden_dropout"),
        Flag("--attention-dropout", "attention_dropout"),
    )),
    "source": Group(C.SourceConfig, "model source", (
        Flag("--model-conf", "model_conf", "model conf name (examples/conf/<org>/<model>) or a yaml "
             "path; the scripts' first positional argument"),
        Flag("--pretrained-model-path", "pretrained_model_path", "local HF model directory", env="HF_MODEL_CKPT"),
        Flag("--load", "load", "dist checkpoint (or HF directory) to load", env="MLM_MODEL_CKPT"),
        Flag("--dist-ckpt-strictness", "strictness", "raise_all refuses a checkpoint that does not "
             "match the model; log_all loads what matches and prints what was skipped", choices=C.STRICTNESS),
        Flag("--skip-checkpoint-hash-check", "verify_hashes", "check shard sizes only, not their "
             "sha256, when loading", negate=True),
    )),
    "save": Group(C.SaveConfig, "checkpoint output", (
        Flag("--save", "save", "where to save the dist checkpoint", env="MLM_MODEL_SAVE"),
        Flag("--keep-last-checkpoints", "keep_last", "after a save, delete all but the newest N iterations"),
    )),
    "batch": Group(C.BatchConfig, "batch", (
        Flag("--micro-batch-size", "micro_batch_size", "sequences per forward"),
        Flag("--global-batch-size", "global_batch_size", "sequences per optimizer step, all DP ranks"),
    )),
    "prompts": Group(C.PromptConfig, "prompts", (
        Flag("--prompts-file", "prompts_file", "json list of strings, jsonl of chat messages, or "
             "text (one prompt a line); default: three built-in prompts"),
        Flag("--no-chat-template", "chat_template", "feed prompts as raw text instead of rendering "
             "the chat template", negate=True),
    )),
    "report": Group(C.ReportConfig, "report", (
        Flag("--json-out", "json_out", "also write the results as json here"),
        Flag("--verbose", "verbose", "print upstream's full tables (ModelOpt's per-quantizer summary)"),
    )),
    "generate": Group(C.GenerateConfig, "generation", (
        Flag("--max-new-tokens", "max_new_tokens"),
        Flag("--temperature", "temperature", "0 = greedy"),
        Flag("--top-p", "top_p"),
        Flag("--top-k", "top_k", "0 = off"),
    )),
    "quantize": Group(C.QuantizeConfig, "quantization", (
        Flag("--export-quant-cfg", "quant_cfg", "ModelOpt config name, yaml/json recipe, or auto "
             "(quantize.sh's second positional argument, or QUANT_CFG)"),
        Flag("--export-kv-cache-quant", "kv_cache_quant", choices=C.KV_CACHE_FORMATS),
        Flag("--auto-quantize-bits", "auto_bits", "with --export-quant-cfg auto: effective weight "
             "bits the per-layer search must meet"),
        Flag("--auto-quantize-formats", "auto_formats", "comma-separated candidate formats for auto "
             "(no quantization is always a candidate)"),
        Flag("--auto-quantize-method", "auto_method", choices=C.AUTO_METHODS),
        Flag("--auto-quantize-score-size", "auto_score_size", "calibration samples used to score "
             "layer sensitivity"),
        Flag("--ppl-windows", "ppl_windows", "512-token windows of the built-in eval text scored "
             "before and after (0: skip)"),
    )),
    "calib": Group(C.CalibConfig, "calibration data", (
        Flag("--calib-dataset", "calib_dataset", "'builtin' (offline text), 'builtin-chat' (built-in "
             "chats), a datasets hub name, or a jsonl/json/parquet/txt file"),
        Flag("--calib-dataset-split", "calib_split"),
        Flag("--calib-dataset-field", "calib_field", "text or chat-messages field (default: messages, "
             "conversations or text)"),
        Flag("--calib-size", "calib_size", "calibration samples"),
        Flag("--calib-seq-length", "calib_seq_length", "tokens per calibration sample"),
    )),
    "eval": Group(C.EvalConfig, "evaluation", (
        Flag("--eval-text-path", "text_path", "plain UTF-8 text file to evaluate"),
        Flag("--eval-dataset", "dataset", "datasets.load_dataset name (hub, when online) or a local "
             "json/jsonl/parquet/csv/txt file or dataset directory"),
        Flag("--eval-dataset-split", "dataset_split", "split of --eval-dataset (any name works for a "
             "local file)"),
        Flag("--eval-dataset-field", "dataset_field", "text column of --eval-dataset"),
        Flag("--eval-max-chunks", "max_chunks", "evaluate at most N --seq-length windows"),
        Flag("--mmlu-path", "mmlu_path", "MMLU-format .csv/.jsonl: also report zero-shot "
             "multiple-choice accuracy"),
        Flag("--skip-perplexity", "perplexity", "MMLU accuracy alone (scripts/mmlu.sh)", negate=True),
    )),
    "export": Group(C.ExportConfig, "export", (
        Flag("--export-dir", "export_dir", "where to write the HF checkpoint", env="EXPORT_DIR"),
        Flag("--export-max-shard-size", "max_shard_size", "largest safetensors shard (5GB, 500MB, "
             "2GiB, bytes); above it the weights are split with model.safetensors.index.json",
             convert=_size),
        Flag("--export-dtype", "dtype", "dtype of the unquantized tensors (auto: the model's)",
             choices=("auto", *C.DTYPE_NAMES)),
        Flag("--overwrite", "overwrite", "replace a non-empty export dir"),
    )),
    "train": Group(C.TrainConfig, "training", (
        Flag("--lr", "lr"), Flag("--min-lr", "min_lr"), Flag("--lr-warmup-iters", "lr_warmup_iters"),
        Flag("--lr-decay-iters", "lr_decay_iters", "default: --train-iters"),
        Flag("--lr-decay-style", "lr_decay_style", choices=C.LR_DECAY_STYLES),
        Flag("--weight-decay", "weight_decay"), Flag("--clip-grad", "clip_grad", "0 disables clipping"),
        Flag("--adam-beta1", "adam_beta1"), Flag("--adam-beta2", "adam_beta2"),
        Flag("--adam-eps", "adam_eps"), Flag("--train-iters", "train_iters"),
        Flag("--override-opt-param-scheduler", "override_opt_param_scheduler",
             "with --load: this run's LR-schedule flags replace the checkpoint's"),
        Flag("--use-checkpoint-opt-param-scheduler", "use_checkpoint_opt_param_scheduler",
             "with --load: keep the checkpoint's LR schedule, whatever the flags say"),
    )),
    "loop": Group(C.LoopConfig, "training loop", (
        Flag("--log-interval", "log_interval"),
        Flag("--eval-interval", "eval_interval", "0: never"), Flag("--eval-iters", "eval_iters"),
        Flag("--save-interval", "save_interval", "0: save at the end only"),
        Flag("--log-file", "log_file", "jsonl of every logged iteration and evaluation"),
        Flag("--no-plot", "plot", "skip loss_curves.png", negate=True),
        Flag("--no-load-optim", "no_load_optim", "with --load: fresh optimizer state"),
        Flag("--no-load-rng", "no_load_rng", "with --load: do not restore the RNG states"),
        Flag("--finetune", "finetune", "with --load: weights only, start at iteration 0"),
        Flag("--no-progress", "progress", "no progress bar", negate=True),
        Flag("--lora-rank", "lora_rank", "train LoRA adapters of this rank (ModelOpt peft), base frozen"),
    )),
    "sft": Group(C.SFTDataConfig, "training data", (
        Flag("--finetune-hf-dataset", "hf_dataset", "datasets hub name (online)"),
        Flag("--finetune-data-files", "data_files", "comma-separated local jsonl/json/parquet "
             "(messages, conversations or prompt/response); default: the built-in chats"),
        Flag("--finetune-data-split", "data_split"),
        Flag("--finetune-data-field", "field", "column holding the chat (default: detect)"),
        Flag("--train-on-all-tokens", "all_tokens", "loss on prompt tokens too, not only the assistant's"),
        Flag("--no-pack-sequences", "pack", "one conversation per sequence (padded)", negate=True),
        Flag("--reset-position-ids", "reset_position_ids", "packed: positions restart per document"),
        Flag("--reset-attention-mask", "reset_attention_mask", "packed: documents attend only to themselves"),
        Flag("--finetune-valid-fraction", "valid_fraction", "share of conversations held out for evaluation"),
    )),
    "synth": Group(C.SynthConfig, "data synthesis", (
        Flag("--output", "output", "jsonl of {\"messages\": [...]}"),
        Flag("--num-conversations", "num_conversations"), Flag("--num-turns", "num_turns"),
        Flag("--synth-batch-size", "batch_size", "sequences generated together"),
        Flag("--topics-file", "topics_file", "seed topics, one a line"),
        Flag("--question-temperature", "question_temperature"), Flag("--question-top-p", "question_top_p"),
        Flag("--max-question-tokens", "max_question_tokens"),
    )),
    "distill": Group(C.DistillConfig, "distillation", (
        Flag("--export-kd-teacher-load", "teacher_load", "teacher: dist checkpoint or HF directory"),
        Flag("--export-kd-teacher-model-config", "teacher_model_config", "teacher architecture: yaml of "
             "overrides or a conf (default: <teacher>/model_config.yaml, else the student's)"),
        Flag("--export-kd-teacher-ckpt-format", "teacher_ckpt_format", choices=C.KD_CKPT_FORMATS),
        Flag("--export-kd-cfg", "kd_cfg", "distillation yaml (logit_layers, intermediate_layer_pairs, "
             "skip_lm_loss, kd_loss_scale, logit_kl_temperature, logit_kl_topk)"),
        Flag("--kd-truncate-vocab", "truncate_vocab", "padded vocabularies of one tokenizer: KL over "
             "the common prefix"),
    )),
    "prune": Group(C.PruneConfig, "pruning", (
        Flag("--prune-export-config", "export_config", "json targets: num_layers, hidden_size, "
             "ffn_hidden_size, num_attention_heads, num_query_groups"),
        Flag("--prune-ppl-windows", "ppl_windows", "512-token windows of the built-in eval text "
             "scored before and after pruning (0: skip)"),
    )),
    "draft": Group(C.DraftConfig, "speculative decoding", (
        Flag("--draft", "draft", choices=C.DRAFTERS),
        Flag("--draft-steps", "draft_steps", "tokens drafted per target step (K)"),
        Flag("--ngram-size", "ngram_size", "ngram: longest context suffix matched"),
        Flag("--draft-model-path", "draft_model_path", "model: HF directory of the draft"),
        Flag("--draft-load", "draft_load", "model / eagle / medusa: dist checkpoint of the draft"),
    )),
    "draft_train": Group(C.DraftTrainConfig, "draft-head training (ModelOpt speculative)", (
        Flag("--algorithm", "algorithm", choices=C.SPEC_ALGORITHMS),
        Flag("--eagle-ttt-steps", "eagle_ttt_steps", "train-time-test steps (loss weights 0.9^i)"),
        Flag("--draft-vocab-size", "draft_vocab_size", "EAGLE draft lm_head over the N most frequent "
             "tokens of the training data (d2t); default: the target's vocabulary"),
        Flag("--eagle-aux-layers", "eagle_aux_layers", "EAGLE-3 target layer ids, comma-separated "
             "(default: 1, L/2-1, L-4)"),
        Flag("--eagle-num-layers", "eagle_num_layers", "EAGLE draft decoder layers"),
        Flag("--eagle-config", "eagle_config", "json of eagle_architecture_config overrides"),
        Flag("--draft-init-from-target", "init_from_target", "warm start: the draft lm_head (EAGLE: its "
             "draft-vocabulary rows, and the final norm) from the target's; Medusa residual blocks zero"),
        Flag("--medusa-num-heads", "medusa_num_heads"), Flag("--medusa-num-layers", "medusa_num_layers"),
    )),
    "acceptance": Group(C.AcceptanceConfig, "acceptance measurement", (
        Flag("--mtbench-path", "mtbench_path", "builtin, FastChat question.jsonl, mt_bench_prompts "
             "rows (jsonl/json/parquet) or a hub name"),
        Flag("--categories", "categories", "comma-separated"),
        Flag("--num-prompts", "num_prompts", "per category"),
        Flag("--osl", "osl", "answer tokens per turn"), Flag("--turns", "turns", "1 or 2"),
        Flag("--plot", "plot", "PNG bar chart (default: beside --json-out)"),
    )),
}

# Read by scripts/launch.sh itself (not by a flag): listed in every --help.
LAUNCHER_ENV = {
    "CONF (first argument)": "model conf, default the embedded SmolLM2-135M-Instruct",
    "TP, PP, DP": "tensor / pipeline / data parallel sizes; the script starts TP*PP*DP ranks "
                  "(under torchrun: an unset TP takes the world size / (PP*DP))",
    "MLM_EXTRA_ARGS": "more flags, as on the command line",
    "NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT": "multi-node torchrun settings",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print the error alone, on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _scalar(tp: Any) -> type:
    """int | None -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _env_default(flag: Flag, kind: type, env: Mapping[str, str]) -> Any:
    raw = env.get(flag.env or "", "")
    if not raw:
        return dataclasses.MISSING
    try:
        return flag.convert(raw) if flag.convert else kind(raw)
    except ValueError:
        raise UsageError(f"{flag.env}={raw!r} is not a valid {flag.flag} value") from None


def _split(spec: str) -> tuple[str, set[str] | None]:
    """``"acceptance"``: the whole group; ``"acceptance:osl,mtbench_path"``: those fields' flags
    only (an entry point that needs a few settings of a group; the others keep their defaults)."""
    name, _, only = spec.partition(":")
    return name, (set(only.split(",")) if only else None)


def _add_group(p: argparse.ArgumentParser, name: str, group: Group, overrides: Mapping[str, Any],
               env: Mapping[str, str], only: set[str] | None = None) -> None:
    g = p.add_argument_group(group.title)
    fields = {f.name: f for f in dataclasses.fields(group.cls)}
    types = typing.get_type_hints(group.cls)
    mutex: dict[str, Any] = {}
    unknown = (only or set()) - {fl.field for fl in group.flags}
    if unknown:
        raise KeyError(f"flag group {name!r} has no flag for {', '.join(sorted(unknown))}")
    for fl in group.flags:
        if only is not None and fl.field not in only:
            continue
        kind = _scalar(types[fl.field])
        dest = f"{name}.{fl.field}"
        default = overrides.get(dest, _default(fields[fl.field]))
        from_env = _env_default(fl, kind, env)
        default = default if from_env is dataclasses.MISSING else from_env
        text = fl.help + (f" [env {fl.env}]" if fl.env else "")
        target = g
        if fl.mutex:
            if fl.mutex not in mutex:
                mutex[fl.mutex] = g.add_mutually_exclusive_group()
            target = mutex[fl.mutex]
        if fl.const is not None:
            target.add_argument(fl.flag, dest=dest, action="store_const", const=fl.const, help=text)
            p.set_defaults(**{dest: default})
        elif kind is bool:
            target.add_argument(fl.flag, dest=dest, action="store_false" if fl.negate else "store_true",
                                help=text)
            p.set_defaults(**{dest: default})
        else:
            shown = f"{text} (default: {default})" if default is not None else text
            target.add_argument(fl.flag, dest=dest, default=default, type=fl.convert or kind,
                                choices=fl.choices, metavar=None if fl.choices else fl.field.upper(),
                                help=shown.strip())


def build_parser(groups: Sequence[str], prog: str, description: str | None = None,
                 defaults: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 script_env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    prog = env.get("PT_SCRIPT") or prog  # the script the user ran (mmlu.sh runs evaluate's entry)
    epilog = "positional arguments and environment of the launch scripts:\n" + "\n".join(
        f"  {k:<44} {v}" for k, v in {**LAUNCHER_ENV, **(script_env or {})}.items())
    usage = f"bash scripts/{prog} [CONF] [flags]  (or: torchrun [--nproc-per-node N] scripts/{prog} ...)"
    p = OneLineParser(prog=prog, usage=usage, description=description, epilog=epilog,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)
    for spec in groups:
        name, only = _split(spec)
        if name not in GROUPS:
            raise KeyError(f"unknown flag group {name!r}")
        _add_group(p, name, GROUPS[name], defaults or {}, env, only)
    return p


def parse(argv: Sequence[str] | None, groups: Sequence[str], *, prog: str, description: str | None = None,
          defaults: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
          script_env: Mapping[str, str] | None = None) -> SimpleNamespace:
    """Parse ``argv`` with the flags of ``groups`` into one config per group (validated), plus
    ``preflight`` (set by the launcher: check the input, start nothing)."""
    ns = build_parser(groups, prog, description, defaults, env, script_env).parse_args(argv)
    raw = vars(ns)
    out = SimpleNamespace(preflight=raw.pop("preflight"))
    for name, _ in map(_split, groups):
        values = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(name + ".")}
        setattr(out, name, GROUPS[name].cls(**values))
    return out

