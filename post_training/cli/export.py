"""Model (HF, or a dist checkpoint, quantized or not) -> unified Hugging Face checkpoint in
EXPORT_DIR (``scripts/export.sh``), through ModelOpt's ``export_mcore_gpt_to_hf``."""
from __future__ import annotations

import argparse

from post_training import arguments
from post_training.checkpointing import resolve_hf_dir, setup_model
from post_training.cli import run_entry, split_preflight
from post_training.export import DEFAULT_SHARD_SIZE, EXPORT_DTYPES, ExportConfig, export_model, parse_size
from post_training.runtime import init_runtime, memory_report
from post_training.utils import print_rank_0


def add_export_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("export")
    g.add_argument("--export-max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help="largest safetensors shard (5GB, 500MB, 2GiB, bytes); above it the weights "
                        "are split with model.safetensors.index.json (ModelOpt itself writes one "
                        "file per layer; they are repacked)")
    g.add_argument("--export-dtype", default="auto", choices=["auto", *EXPORT_DTYPES],
                   help="dtype of the unquantized tensors (auto: the model's, --bf16/--fp16 or fp32)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty export dir")


def export_config(ns: argparse.Namespace) -> ExportConfig:
    return ExportConfig(export_dir=ns.export_dir, max_shard_size=parse_size(ns.export_max_shard_size),
                        dtype=ns.export_dtype, overwrite=ns.overwrite)


def main(argv: list[str]) -> int:
    preflight, argv = split_preflight(argv)
    ns = arguments.parse(argv, add_export_args, prog="export")
    par, mcfg, src = arguments.common_configs(ns)
    ecfg = export_config(ns)
    src.validate(par)
    ecfg.validate(src)
    if preflight:
        return 0
    rt = init_runtime(par)
    model, _, _ = setup_model(src, mcfg, rt)
    export_model(model, rt, resolve_hf_dir(src), ecfg, mcfg.torch_dtype)
    print_rank_0(memory_report("memory"))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
