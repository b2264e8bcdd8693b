"""A trained EAGLE-3 head (a checkpoint of scripts/eagle3.sh): ModelOpt's own step-0 draft tokens
(its training forward, teacher-forced, the same computation its loss and eagle_report_acc use)
against the toolkit's native head on the same sequences, and both heads' top-1 agreement with the
target, over the answer positions of greedy answers to the built-in MT-Bench-style prompts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eagle_agreement.py CKPT [--prompts 8] [--osl 48]

Native == ModelOpt near 1.0 says inference computes what training trained; the top-1 rate is what
draft position 1 of the speculative loop accepts (acceptance.sh's pos1).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)
from post_training.config import ModelConfig, SourceConfig, GenerateConfig
from post_training.runtime import ParallelConfig, init_runtime
from post_training.utils import free_port
ap = argparse.ArgumentParser()
ap.add_argument("load")
ap.add_argument("--prompts", type=int, default=8)
ap.add_argument("--osl", type=int, default=48)
a = ap.parse_args()
os.environ.setdefault("MASTER_PORT", str(free_port()))
torch.set_num_threads(1)
rt = init_runtime(ParallelConfig(device="cpu"))
from post_training.model_builder import setup_model
from post_training.generate import generate
from post_training.speculative.head_drafter import head_drafter
from post_training.speculative.eagle_draft import build_head
from post_training.speculative.head_layout import HeadConfig
from post_training.speculative.head_state import draft_head_state
from post_training.inference import KVCache
from post_training.inference.hidden import HiddenCapture
from post_training.data import render_prompt
from post_training.speculative.mtbench import load_mtbench
src = SourceConfig(load=a.load)
model, tok, hfc = setup_model(src, ModelConfig(), rt, inference=False)
cfg, state = draft_head_state(model)
head = build_head(HeadConfig.from_hf(cfg), state)
plain, _, _ = setup_model(SourceConfig(), ModelConfig(), rt)
drafter = head_drafter(head, plain)
prompts = load_mtbench("builtin")[::2][:a.prompts]
agree = tot = mo_hit = my_hit = 0
for p in prompts:
    ids = render_prompt([{"role": "user", "content": p.turns[0]}], tok)
    ans = generate(plain, ids, GenerateConfig(max_new_tokens=a.osl))
    seq = ids + ans
    # ModelOpt: the training forward's step-0 eagle logits (hook), target logits
    outs = []
    h = model.eagle_module.eagle_output_layer.register_forward_hook(lambda m, a, o: outs.append(o[0].detach()))
    with torch.no_grad():
        x = torch.tensor([seq])
        model(input_ids=x, position_ids=torch.arange(len(seq))[None], attention_mask=None, labels=x)
    h.remove()
    mo = outs[0][:, 0].argmax(-1)
    mo = mo + model.eagle_module.d2t[mo]
    # native: hidden of the whole sequence, one append of every entry
    cache = KVCache(1, len(seq))
    with torch.inference_mode(), HiddenCapture(plain, drafter.hidden_spec) as cap:
        logits_t = cache.forward(plain, x, all_logits=True)
    hid = cap.result(len(seq), 1)[:, 0].float()
    head.truncate(0)
    with torch.inference_mode():
        lg, _ = head.append(drafter.embedding[torch.tensor(seq[1:] + [0])], head.project(hid))
    mine = head.to_target(lg.argmax(-1))
    tgt = logits_t[0].argmax(-1)  # target's prediction at each position
    # row t predicts token t+2 = target argmax at position t+1; answer rows only
    lo, hi = len(ids) - 1, len(seq) - 2
    for t in range(lo, hi):
        tot += 1
        agree += int(mine[t] == mo[t])
        mo_hit += int(mo[t] == tgt[t + 1])
        my_hit += int(mine[t] == tgt[t + 1])
print(f"{len(prompts)} answers, {tot} draft positions: native == ModelOpt step-0 token {agree / tot:.4f}; "
      f"top-1 vs target: ModelOpt {mo_hit / tot:.4f}, native {my_hit / tot:.4f}")
