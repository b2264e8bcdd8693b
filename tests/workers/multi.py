"""Worker: several checks of one parallel layout in ONE launch (each launch costs ~10-20 s of
process start-up on this machine, so the multi-rank tests share three launches; see
tests/conftest.py `mr_*` fixtures). Tasks run in the order given:

  --forward            logits + greedy tokens of the chat prompt (forward.py), with --kv the
                       KV-cache checks in both key formats
  --train              4 training steps on a fixed batch (train.py)
  --loop               6 iterations of the training loop with evaluation (loop.py)
  --loop-dp            last: the same at TP=1 PP=1 over all ranks (DP = world size)
  --batched            batched greedy generation, prompts of different lengths (batched_gen.py)
  --save NAME=DIR[:Q]  build from --hf-dir, quantize with Q (fp8 | fp8-kv | int8, ckpt.py),
                       save at iteration 10, and record logits / amax
  --load NAME=DIR      load DIR at this layout and record logits / amax
  --distill TEACHER    3 distillation steps toward TEACHER with --kd-cfg (distill.py)
  --distill-dp         last: the same at TP=1 PP=1 over all ranks (DP = world size)
  --spec               speculative generation: plain, n-gram, model drafter, random EAGLE-3 /
                       EAGLE-1 / Medusa heads, sampled (spec.py)
  --acceptance         report_draft_acceptance_length with an n-gram drafter (every rank
                       must return the same numbers)
  --prune DIR          Minitron depth pruning 4 -> 2 layers on the built-in calibration text
                       (4 x 64 tokens), saved to DIR; records layer scores, dropped layers, logits
  --eagle              3 EAGLE-3 draft-head training steps with a draft vocabulary (draft_heads.py),
                       then the loop's draft AL report on the trained head;
                       the losses and the gathered head (every rank must hold the same)

Rank 0 writes {task: result} (each result from the rank that holds it) to --out with torch.save.
"""
import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

import batched_gen
import ckpt
import distill
import draft_heads
import forward
import loop
import spec
import train
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime


def same_on_every_rank(out):
    """``out``, after checking that every rank computed the same."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if any(g != out for g in gathered):
        raise AssertionError(f"ranks disagree: {gathered}")
    return out


def acceptance(hf_dir: str, rt) -> dict:
    from post_training.config import ModelConfig, SourceConfig
    from post_training.hf import load_tokenizer
    from post_training.model_builder import setup_model
    from post_training.non_loss_data_func import report_draft_acceptance_length
    from post_training.speculative import NgramDrafter

    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir), ModelConfig(), rt)
    out = report_draft_acceptance_length(model, load_tokenizer(hf_dir), NgramDrafter(3), osl=8,
                                         draft_steps=3)
    return same_on_every_rank(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--forward", action="store_true")
    p.add_argument("--kv", action="store_true")
    p.add_argument("--train", action="store_true")
    p.add_argument("--loop", action="store_true")
    p.add_argument("--loop-dp", action="store_true")
    p.add_argument("--batched", action="store_true")
    p.add_argument("--save", action="append", default=[])
    p.add_argument("--load", action="append", default=[])
    p.add_argument("--distill")
    p.add_argument("--kd-cfg")
    p.add_argument("--distill-dp", action="store_true")
    p.add_argument("--spec", action="store_true")
    p.add_argument("--acceptance", action="store_true")
    p.add_argument("--prune")
    p.add_argument("--eagle", action="store_true")
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    mine: dict = {}
    if a.forward:
        mine["forward"] = forward.run(a.hf_dir, rt, kv=a.kv)
    if a.train:
        mine["train"] = same_on_every_rank(train.run(a.hf_dir, rt))
    if a.loop:
        mine["loop"] = loop.run(a.hf_dir, rt, iters=6, eval_interval=3)  # same on every rank
    if a.spec:
        mine["spec"] = spec.run(a.hf_dir, rt)
    if a.batched:
        mine["batched"] = batched_gen.run(a.hf_dir, rt)
    for item in a.save:
        name, _, target = item.partition("=")
        root, _, quant = target.partition(":")
        model = ckpt.build(rt, a.hf_dir, quantize=quant or None)
        ckpt.save(model, rt, root, 10, a.hf_dir)
        mine[f"save:{name}"] = ckpt.outputs(model, rt)
    for item in a.load:
        name, _, root = item.partition("=")
        mine[f"load:{name}"] = ckpt.outputs(ckpt.build(rt, load=root), rt)
    if a.prune:
        mine["prune"] = prune(rt, a.hf_dir, a.prune)
    if a.acceptance:
        mine["acceptance"] = acceptance(a.hf_dir, rt)
    if a.distill:
        mine["distill"] = _distill(a, rt)
    if a.eagle:
        mine["eagle"] = _eagle(a, rt)
    if a.distill_dp:  # changes the layout: keep it last
        mine["distill:dp"] = _distill(a, distill.relayout(rt, 1, 1))
    if a.loop_dp:  # changes the layout too
        mine["loop:dp"] = loop.run(a.hf_dir, distill.relayout(rt, 1, 1), iters=6, eval_interval=3)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() == 0:
        merged = {}
        for part in parts:
            merged.update({k: v for k, v in part.items() if v is not None and k not in merged})
        torch.save(merged, a.out)
    destroy_runtime()


def _distill(a, rt) -> dict:
    out = distill.run(a.hf_dir, a.distill, rt, kd_cfg=a.kd_cfg)
    out = {"losses": out["losses"], "grad_norm": out["grad_norm"],
           "layout": (rt.tp, rt.pp, ps.get_data_parallel_world_size())}
    return same_on_every_rank(out)


def _eagle(a, rt) -> dict:
    out = draft_heads.train(a.hf_dir, rt, "eagle3", steps=3, acceptance=True, init_from_target=True)
    checksums = {k: float(v.double().sum()) for k, v in out["head"].items()}
    same_on_every_rank({"losses": out["losses"], "head": checksums, "frozen": out["target_unchanged"],
                        "acceptance": out["acceptance"]})
    return {k: out[k] for k in ("losses", "head", "target_unchanged", "target_grads", "acceptance")}


def prune(rt, hf_dir: str, root: str) -> dict | None:
    from pathlib import Path

    from post_training.config import CalibConfig
    from post_training.hf import load_tokenizer
    from post_training.inference import stage_forward
    from post_training.pruning import prune_model, save_pruned
    from post_training.quantization.calibration import calibration_samples, forward_loop

    model = ckpt.build(rt, hf_dir)
    samples = calibration_samples(CalibConfig(calib_size=4, calib_seq_length=64), load_tokenizer(hf_dir))
    res = prune_model(model, {"num_layers": 2},
                      forward_loop(samples, lambda m, t: stage_forward(m, t, None), progress=False))
    save_pruned(model, rt, root, Path(hf_dir), res.before, model_conf="test")
    out = ckpt.outputs(model, rt)
    if out is None:
        return None
    return {"logits": out["logits"], "layer_scores": res.layer_scores, "dropped": res.dropped,
            "params": res.params_after}


if __name__ == "__main__":
    main()
