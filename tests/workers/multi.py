"""Worker: several checks of one parallel layout in ONE launch (each launch costs ~10-20 s of
process start-up on this machine, so the multi-rank tests share three launches; see
tests/conftest.py `mr_*` fixtures). Tasks run in the order given:

  --forward            logits + greedy tokens of the chat prompt (forward.py), with --kv the
                       KV-cache checks in both key formats
  --train              4 training steps on a fixed batch (train.py)
  --batched            batched greedy generation, prompts of different lengths (batched_gen.py)
  --save NAME=DIR[:Q]  build from --hf-dir, quantize with Q (fp8 | fp8-kv | int8, ckpt.py),
                       save at iteration 10, and record logits / amax
  --load NAME=DIR      load DIR at this layout and record logits / amax

Rank 0 writes {task: result} (each result from the rank that holds it) to --out with torch.save.
"""
import argparse

import torch
import torch.distributed as dist

import batched_gen
import ckpt
import forward
import train
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--forward", action="store_true")
    p.add_argument("--kv", action="store_true")
    p.add_argument("--train", action="store_true")
    p.add_argument("--batched", action="store_true")
    p.add_argument("--save", action="append", default=[])
    p.add_argument("--load", action="append", default=[])
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    mine: dict = {}
    if a.forward:
        mine["forward"] = forward.run(a.hf_dir, rt, kv=a.kv)
    if a.train:
        out = train.run(a.hf_dir, rt)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        if any(g != out for g in gathered):
            raise AssertionError(f"ranks disagree: {gathered}")
        mine["train"] = out
    if a.batched:
        mine["batched"] = batched_gen.run(a.hf_dir, rt)
    for spec in a.save:
        name, _, target = spec.partition("=")
        root, _, quant = target.partition(":")
        model = ckpt.build(rt, a.hf_dir, quantize=quant or None)
        ckpt.save(model, rt, root, 10, a.hf_dir)
        mine[f"save:{name}"] = ckpt.outputs(model, rt)
    for spec in a.load:
        name, _, root = spec.partition("=")
        mine[f"load:{name}"] = ckpt.outputs(ckpt.build(rt, load=root), rt)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if dist.get_rank() == 0:
        merged = {}
        for part in parts:
            merged.update({k: v for k, v in part.items() if v is not None and k not in merged})
        torch.save(merged, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
