"""Model (HF, or a dist checkpoint, quantized or not) -> unified Hugging Face checkpoint in
EXPORT_DIR (``scripts/export.sh``), through ModelOpt's ``export_mcore_gpt_to_hf``."""
from __future__ import annotations

from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.utils import print_rank_0

GROUPS = ["runtime", "model", "source", "export"]


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="export.sh",
                           description="model -> unified Hugging Face checkpoint (ModelOpt exporter)")
    hf.check_source(args.source, args.runtime)
    args.export.validate(args.source)
    if args.preflight:
        return 0
    from post_training.export import export_model
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime, memory_report

    rt = init_runtime(args.runtime)
    model, _, hf_config = setup_model(args.source, args.model, rt)
    export_model(model, rt, Path(hf_config.name_or_path), args.export, args.model.torch_dtype)
    print_rank_0(memory_report("memory"))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
