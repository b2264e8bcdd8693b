"""HF model -> megatron-core dist checkpoint at this run's TP/PP (``scripts/convert.sh``).

Also reshards: with ``--load`` of a dist checkpoint, it is saved again at the new TP/PP.
"""
from __future__ import annotations

from post_training import arguments
from post_training.checkpointing import resolve_hf_dir, save_checkpoint, setup_model
from post_training.cli import run_entry, split_preflight
from post_training.runtime import init_runtime, memory_report
from post_training.utils import UsageError, print_rank_0


def main(argv: list[str]) -> int:
    preflight, argv = split_preflight(argv)
    ns = arguments.parse(argv, prog="convert")
    par, mcfg, src = arguments.common_configs(ns)
    if not src.save:
        raise UsageError("convert needs --save (MLM_MODEL_SAVE): where to write the dist checkpoint")
    src.validate(par)
    if preflight:
        return 0
    rt = init_runtime(par)
    model, _, _ = setup_model(src, mcfg, rt)
    save_checkpoint(model, rt, src.save, None, hf_dir=resolve_hf_dir(src), model_conf=src.model_conf,
                    keep_last=src.keep_last)
    print_rank_0(memory_report("memory"))
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
