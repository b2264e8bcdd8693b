"""Command-line flags (Megatron-LM names) parsed once into typed configs.

Only this module knows flag names; everything else receives the dataclasses below or
those of the module that owns them (ParallelConfig, ModelConfig, GenerateConfig).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from post_training.checkpointing import SourceConfig
from post_training.generate import GenerateConfig
from post_training.hf import EMBEDDED_MODEL
from post_training.model_builder import ModelConfig
from post_training.runtime import ParallelConfig


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print the error alone, on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and parallelism")
    g.add_argument("--model-conf", default=EMBEDDED_MODEL,
                   help="model conf name (examples/conf/<org>/<model>) or a yaml path")
    g.add_argument("--pretrained-model-path", default=None, help="local HF model directory")
    g.add_argument("--load", default=None, help="checkpoint to load")
    g.add_argument("--save", default=None, help="where to save a checkpoint")
    g.add_argument("--export-dir", default=None)
    g.add_argument("--export-quant-cfg", default=None)
    g.add_argument("--export-kd-teacher-load", default=None)
    g.add_argument("--dist-ckpt-strictness", default="raise_all", choices=["raise_all", "log_all"],
                   help="raise_all refuses a checkpoint that does not match the model; "
                        "log_all loads what matches and prints what was skipped")
    g.add_argument("--keep-last-checkpoints", type=int, default=None,
                   help="after a save, delete all but the newest N iterations")
    g.add_argument("--skip-checkpoint-hash-check", action="store_true",
                   help="check shard sizes only, not their sha256, when loading")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--transformer-impl", default="auto",
                   choices=["auto", "local", "transformer_engine"])
    d = g.add_mutually_exclusive_group()
    d.add_argument("--bf16", action="store_true")
    d.add_argument("--fp16", action="store_true")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompts-file", default=None,
                   help="json list of strings, jsonl of chat messages, or text (one prompt a line)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text instead of rendering the chat template")
    g.add_argument("--json-out", default=None, help="also write the answers as json here")


def parse(argv: list[str] | None, *groups: Callable[[argparse.ArgumentParser], None],
          prog: str | None = None) -> argparse.Namespace:
    p = OneLineParser(prog=prog)
    add_common_args(p)
    for add in groups:
        add(p)
    return p.parse_args(argv)


def parallel_config(ns: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(tp=ns.tensor_model_parallel_size, pp=ns.pipeline_model_parallel_size,
                          device=ns.device, seed=ns.seed)


def model_config(ns: argparse.Namespace) -> ModelConfig:
    dtype = "bf16" if ns.bf16 else "fp16" if ns.fp16 else "fp32"
    return ModelConfig(dtype=dtype, seq_length=ns.seq_length, transformer_impl=ns.transformer_impl,
                       hidden_dropout=ns.hidden_dropout, attention_dropout=ns.attention_dropout)


def source_config(ns: argparse.Namespace) -> SourceConfig:
    return SourceConfig(
        model_conf=ns.model_conf,
        pretrained_model_path=ns.pretrained_model_path,
        load=ns.load,
        save=ns.save,
        export_dir=ns.export_dir,
        export_quant_cfg=ns.export_quant_cfg,
        export_kd_teacher_load=ns.export_kd_teacher_load,
        strictness=ns.dist_ckpt_strictness,
        verify_hashes=not ns.skip_checkpoint_hash_check,
        keep_last=ns.keep_last_checkpoints,
    )


def common_configs(ns: argparse.Namespace) -> tuple[ParallelConfig, ModelConfig, SourceConfig]:
    """The three configs every task needs, from the common flags."""
    return parallel_config(ns), model_config(ns), source_config(ns)


def generate_config(ns: argparse.Namespace, stop_token_ids: list[int] | None = None) -> GenerateConfig:
    return GenerateConfig(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                          top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed,
                          stop_token_ids=list(stop_token_ids or []))
