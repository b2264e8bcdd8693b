"""Training: ``scripts/finetune.sh`` (SFT, and QAT when --load is a quantized checkpoint) and
``scripts/distill.sh`` (the same with --export-kd-teacher-load). One loop for all of them
(:mod:`post_training.train_loop`); what differs is the model: quantized, LoRA, or a ModelOpt
DistillationModel around the student.
"""
from __future__ import annotations

import os

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.utils import UsageError, print_rank_0, warn_rank_0

GROUPS = ["runtime", "model", "source", "save", "batch", "train", "loop", "sft", "distill"]


def _data_parallel_size(tp: int, pp: int) -> int:
    """DP before any rank starts: torchrun's world size, else the launcher's DP."""
    world = int(os.environ.get("WORLD_SIZE") or 0) or tp * pp * int(os.environ.get("DP") or 1)
    return max(world // (tp * pp), 1)


def check(args) -> None:
    """Everything that needs no process group: the launcher runs it once before N ranks start."""
    hf.check_source(args.source, args.runtime)
    dp = _data_parallel_size(args.runtime.tp, args.runtime.pp)
    args.batch.num_microbatches(dp)  # --global-batch-size vs --micro-batch-size x DP: one error line
    if args.loop.save_interval and not args.save.save:
        raise UsageError("--save-interval needs --save (or MLM_MODEL_SAVE)")
    if (args.loop.finetune or args.loop.no_load_optim or args.loop.no_load_rng) and not args.source.load:
        raise UsageError("--finetune / --no-load-optim / --no-load-rng need --load (or MLM_MODEL_CKPT)")
    if args.distill.enabled:
        from post_training.distillation import check_distill_inputs  # yaml only, no megatron-core

        check_distill_inputs(args.distill)
        if args.loop.lora_rank:
            raise UsageError("--lora-rank with distillation is not supported: train the full student")


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="finetune.sh",
                           description="supervised fine-tuning (QAT on a quantized --load, distillation "
                                       "with --export-kd-teacher-load) with Megatron's training loop")
    check(args)
    if args.preflight:
        return 0
    from post_training.chat_data import build_sft_datasets
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime
    from post_training.train_loop import TrainData, apply_lora, quantizer_summary, run_training

    rt = init_runtime(args.runtime)
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    # bad data fails before the model is built
    train_split, valid_split = build_sft_datasets(args.sft, tok, args.model.seq_length, args.runtime.seed)
    if args.loop.eval_interval and valid_split is None:
        warn_rank_0("--eval-interval given but there is no validation split (--finetune-valid-fraction): "
                    "no evaluation")
    if not args.save.save:
        warn_rank_0("no --save (MLM_MODEL_SAVE): the trained model will not be saved")
    model, tok, hf_config = setup_model(args.source, args.model, rt, inference=False, hf_dir=hf_dir)
    quant = quantizer_summary(model)
    if quant:
        print_rank_0(quant)
    if args.loop.lora_rank:
        print_rank_0(apply_lora(model, args.loop.lora_rank, args.runtime.seed))
    adjust = None
    if args.distill.enabled:
        from post_training.distillation import setup_distillation

        model, adjust = setup_distillation(model, args.distill, args.source, args.model, rt, tok)
    data = TrainData.from_splits(train_split, valid_split, args.batch, rt)
    res = run_training(model, rt, data, train=args.train, batch=args.batch, loop=args.loop, save=args.save,
                       load=args.source.load, seed=args.runtime.seed, hf_dir=hf_dir,
                       model_conf=args.source.model_conf, adjust_tensor_shapes_fn=adjust)
    print_rank_0(res.summary())
    if res.last_checkpoint:
        print_rank_0(f"checkpoint: {res.last_checkpoint.parent}\nnext:\n"
                     f"  MLM_MODEL_CKPT={res.last_checkpoint.parent} bash scripts/generate.sh\n"
                     f"  MLM_MODEL_CKPT={res.last_checkpoint.parent} bash scripts/evaluate.sh\n"
                     f"  MLM_MODEL_CKPT={res.last_checkpoint.parent} EXPORT_DIR=<dir> bash scripts/export.sh")
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
