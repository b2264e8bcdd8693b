"""Draft-head training: ``scripts/eagle3.sh`` (Megatron-LM's name) trains an EAGLE-3, EAGLE-1 or
Medusa head (``--algorithm``) on the frozen target with ModelOpt's megatron plugins, online: every
step runs the target and the head learns its hidden states / next-token distribution.

Megatron-LM converts in one process (``convert_model.py --algorithm eagle3``) and trains in
another; here one run does both: a target without a head is converted (and ``d2t`` calibrated
from the training data with ``--draft-vocab-size``), a ``--load`` that already holds a head
(a previous run's checkpoint) resumes it. The loop, data, logging and checkpoints are the SFT
ones (:mod:`post_training.train_loop`, :mod:`post_training.chat_data`).

Every ``--eval-interval`` iterations and at the end, the head being trained drafts for the
target on the first prompt of each category of ``--mtbench-path`` (default: the built-in offline
set, first turns; ``--osl`` tokens, ``--draft-steps`` K): the ``draft AL`` line, an
``acceptance`` record in ``--log-file`` and ``acceptance_curve.png`` (AL against training tokens)
beside ``loss_curves.png`` (:func:`post_training.non_loss_data_func.draft_acceptance_tracker`).
"""
from __future__ import annotations

import os

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.utils import UsageError, print_rank_0, warn_rank_0

GROUPS = ["runtime", "model", "source", "save", "batch", "train", "loop", "sft", "draft_train",
          "draft:draft_steps", "acceptance:osl,mtbench_path"]


def check(args) -> None:
    """Everything that needs no process group: the launcher runs it before N ranks start."""
    hf.check_source(args.source, args.runtime)
    tp, pp = args.runtime.tp, args.runtime.pp
    world = int(os.environ.get("WORLD_SIZE") or 0) or tp * pp * int(os.environ.get("DP") or 1)
    args.batch.num_microbatches(max(world // (tp * pp), 1))
    if args.loop.save_interval and not args.save.save:
        raise UsageError("--save-interval needs --save (or MLM_MODEL_SAVE)")
    if (args.loop.finetune or args.loop.no_load_optim or args.loop.no_load_rng) and not args.source.load:
        raise UsageError("--finetune / --no-load-optim / --no-load-rng need --load (or MLM_MODEL_CKPT)")
    if pp > 1:
        raise UsageError("draft-head training needs PP=1 (ModelOpt's megatron EAGLE/Medusa plugins "
                         "support pipeline parallelism for export only); use TP")
    cfg = args.draft_train
    if cfg.draft_vocab_size is not None and cfg.draft_vocab_size % tp:
        raise UsageError(f"--draft-vocab-size {cfg.draft_vocab_size} must be divisible by TP={tp}")
    shape = hf.source_shape(args.source)
    if {"num_hidden_layers", "vocab_size"} <= shape.keys():
        cfg.check_target(int(shape["num_hidden_layers"]), int(shape["vocab_size"]))
    from post_training.speculative.mtbench import load_mtbench

    load_mtbench(args.acceptance.mtbench_path)  # the acceptance prompts: a bad file fails here


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="eagle3.sh",
                           description="train a speculative draft head (EAGLE-3, EAGLE-1, Medusa) on the "
                                       "frozen target with ModelOpt, Megatron's training loop")
    check(args)
    if args.preflight:
        return 0
    from post_training.chat_data import build_sft_datasets
    from post_training.model_builder import setup_model
    from post_training.non_loss_data_func import draft_acceptance_tracker
    from post_training.runtime import init_runtime
    from post_training.speculative import heads
    from post_training.train_loop import TrainData, run_training

    cfg = args.draft_train
    rt = init_runtime(args.runtime)
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    train_split, valid_split = build_sft_datasets(args.sft, tok, args.model.seq_length, args.runtime.seed)
    if args.loop.eval_interval and valid_split is None:
        warn_rank_0("--eval-interval given but there is no validation split (--finetune-valid-fraction): "
                    "no validation loss (the draft AL is still reported)")
    if not args.save.save:
        warn_rank_0("no --save (MLM_MODEL_SAVE): the trained head will not be saved")
    model, tok, hf_config = setup_model(args.source, args.model, rt, inference=False, hf_dir=hf_dir)
    kind = heads.draft_kind(model)
    if kind is not None:
        heads.check_loaded_head(kind, cfg)
    else:
        d2t = None
        if cfg.draft_vocab_size is not None:
            counts = heads.count_tokens((train_split[i] for i in range(len(train_split))), hf_config.vocab_size)
            d2t = heads.calibrate_d2t(counts, cfg.draft_vocab_size)
            print_rank_0(f"draft vocabulary: {cfg.draft_vocab_size} of {hf_config.vocab_size} tokens, "
                         f"{100 * heads.d2t_coverage(counts, d2t):.1f}% of the training tokens")
        model = heads.convert_model(model, cfg, hf_config, rt, d2t, seed=args.runtime.seed)
        print_rank_0(f"{cfg.algorithm} head attached (ModelOpt speculative mode "
                     f"{'medusa' if cfg.algorithm == 'medusa' else 'eagle'})")
    heads.prepare_for_training(model)
    print_rank_0(heads.parameter_report(model)[2])
    data = TrainData.from_splits(train_split, valid_split, args.batch, rt)
    track = draft_acceptance_tracker(tok, hf_config, osl=args.acceptance.osl, draft_steps=args.draft.draft_steps,
                                     mtbench_path=args.acceptance.mtbench_path)
    res = run_training(model, rt, data, train=args.train, batch=args.batch, loop=args.loop, save=args.save,
                       load=args.source.load, seed=args.runtime.seed, hf_dir=hf_dir,
                       model_conf=args.source.model_conf, non_loss_data_func=track)
    summary = res.summary()
    al = [r for r in res.records if r["kind"] == "acceptance"]
    if al:
        summary += f" | draft AL {al[-1]['al']:.3f} (K={args.draft.draft_steps}, ratio of sums)"
    print_rank_0(summary)
    if res.last_checkpoint:
        draft = "medusa" if cfg.algorithm == "medusa" else "eagle"
        print_rank_0(f"checkpoint (target + head): {res.last_checkpoint.parent}\nnext:\n"
                     f"  MLM_MODEL_CKPT={res.last_checkpoint.parent} bash scripts/acceptance.sh --draft {draft}\n"
                     f"  MLM_MODEL_CKPT={res.last_checkpoint.parent} bash scripts/eagle3.sh --train-iters "
                     f"{res.iteration * 2} --override-opt-param-scheduler   # train on")
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
