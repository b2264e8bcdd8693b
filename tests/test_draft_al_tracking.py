"""Acceptance length tracked while a draft head trains (cli/eagle3.py -> train_loop's
non_loss_data_func -> non_loss_data_func.draft_acceptance_tracker) on the tiny llama: records at
every --eval-interval and at the end, AL >= 1 on each category of the offline set, the PNG
beside the loss curves, training going on after a report (the plugin's aux-state hooks left
clean), the reported AL the one the saved head gives through --draft eagle; Medusa checkpoints
save and load. TP=2 (every rank the same AL as TP=1): tests/test_draft_heads.py."""
from __future__ import annotations

import json

import pytest

from post_training.config.speculative import MTBENCH_CATEGORIES

OSL = 8


@pytest.fixture(scope="module")
def trained(tiny_llama, runtime, tmp_path_factory):
    from post_training.cli import eagle3

    out = tmp_path_factory.mktemp("eagle3_al")
    argv = ["--pretrained-model-path", str(tiny_llama), "--train-iters", "3", "--eval-interval", "2",
            "--seq-length", "64", "--global-batch-size", "2", "--micro-batch-size", "2", "--lr", "1e-2",
            "--draft-vocab-size", "4096", "--eagle-ttt-steps", "2", "--osl", str(OSL), "--draft-steps", "3",
            "--save", str(out / "ck"), "--log-file", str(out / "log.jsonl"), "--no-progress",
            "--finetune-valid-fraction", "0"]
    assert eagle3.main(argv) == 0
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return out, recs


def test_acceptance_records_at_the_interval_and_the_end(trained, capsys):
    out, recs = trained
    acc = [r for r in recs if r["kind"] == "acceptance"]
    assert [r["iteration"] for r in acc] == [2, 3]  # interval 2, then the end
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3]  # the step after a report ran
    for r in acc:
        assert r["consumed_samples"] == 2 * r["iteration"]
        assert r["consumed_tokens"] == r["consumed_samples"] * 64
        assert set(r["categories"]) == set(MTBENCH_CATEGORIES)
        assert all(al >= 1.0 for al in r["categories"].values()) and r["al"] >= 1.0
        assert r["al"] == pytest.approx(r["tokens"] / r["steps"]) and r["tokens"] <= OSL * len(MTBENCH_CATEGORIES)
        assert r["draft_steps"] == 3 and r["osl"] == OSL and "ratio of sums" in r["definition"]
    assert (out / "ck" / "acceptance_curve.png").stat().st_size > 1000
    assert (out / "ck" / "loss_curves.png").is_file()


def test_reported_al_is_the_saved_heads(trained, tiny_llama, runtime):
    """The last record (after the last step) equals what --draft eagle measures from the saved
    checkpoint's head on the same prompts: the tracker drafts with the live weights."""
    from post_training.config import DraftConfig, ModelConfig, SourceConfig
    from post_training.generate import stop_token_ids
    from post_training.model_builder import setup_model
    from post_training.speculative import build_drafter
    from post_training.speculative.acceptance import measure_acceptance, summarize
    from post_training.speculative.mtbench import load_mtbench, select_prompts

    out, recs = trained
    last = [r for r in recs if r["kind"] == "acceptance"][-1]
    src = SourceConfig(load=str(out / "ck"), pretrained_model_path=str(tiny_llama))
    model, tok, hfc = setup_model(src, ModelConfig(), runtime, hf_dir=tiny_llama)
    drafter = build_drafter(DraftConfig(draft="eagle"), tok, hfc, target=model, load=src.load)
    res = measure_acceptance(model, tok, drafter, select_prompts(load_mtbench("builtin"), num_prompts=1),
                             osl=OSL, draft_steps=3, stop_token_ids=stop_token_ids(tok, hfc))
    s = summarize(res, 3)
    assert (s["overall"]["tokens"], s["overall"]["steps"]) == (last["tokens"], last["steps"])
    assert {c: g["al"] for c, g in s["categories"].items()} == last["categories"]


def test_medusa_head_saves_and_loads(tiny_llama, runtime, tmp_path):
    """A Medusa checkpoint saves (ModelOpt's heads pass the caller's sharded-state-dict metadata
    on to megatron's linear layers, which need dp_cp_group) and --load re-creates the head."""
    import torch

    from post_training.checkpointing.save import save_checkpoint
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model
    from post_training.speculative.head_state import draft_head_state
    from post_training.speculative.heads import draft_kind
    from workers import draft_heads

    model, _ = draft_heads.build(str(tiny_llama), runtime, "medusa", draft_vocab=None)
    _, state = draft_head_state(model)
    save_checkpoint(model, runtime, tmp_path / "ck", 1, hf_dir=tiny_llama)
    loaded, _, _ = setup_model(SourceConfig(load=str(tmp_path / "ck"), pretrained_model_path=str(tiny_llama)),
                               ModelConfig(), runtime, hf_dir=tiny_llama)
    assert draft_kind(loaded) == "medusa"
    _, again = draft_head_state(loaded)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
