"""HF model -> megatron-core dist checkpoint at this run's TP/PP (``scripts/convert.sh``).

Also reshards: with ``--load`` of a dist checkpoint, it is saved again at the new TP/PP.
"""
from __future__ import annotations

from pathlib import Path

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.utils import UsageError, print_rank_0

GROUPS = ["runtime", "model", "source", "save"]


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="convert.sh",
                           description="HF model or dist checkpoint -> dist checkpoint at this TP/PP")
    if not args.save.save:
        raise UsageError("convert needs --save (MLM_MODEL_SAVE): where to write the dist checkpoint")
    hf.check_source(args.source, args.runtime)
    if args.preflight:
        return 0
    from post_training.checkpointing import save_checkpoint
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime, memory_report

    rt = init_runtime(args.runtime)
    model, _, hf_config = setup_model(args.source, args.model, rt)
    save_checkpoint(model, rt, args.save.save, None, hf_dir=Path(hf_config.name_or_path),
                    model_conf=args.source.model_conf, keep_last=args.save.keep_last)
    print_rank_0(memory_report("memory"))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
