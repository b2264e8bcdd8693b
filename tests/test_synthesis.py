"""Batched generation (left-padded rows through one KV cache) against per-prompt generation,
and Magpie-style synthesis: the template cut, the filters, the CLI end to end on SmolLM2."""
import json

import pytest
import torch

from workers.batched_gen import prompts, stops_of
from post_training.config import GenerateConfig, ModelConfig, SourceConfig, SynthConfig
from post_training.utils import UsageError


@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    from post_training.model_builder import setup_model

    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    return model, tok


def per_prompt(model, ps, cfg):
    from post_training.generate import generate

    return [generate(model, p, cfg) for p in ps]


@pytest.fixture(scope="module")
def reference(tiny):
    """Per-prompt greedy tokens at TP=1 (the multi-rank checks compare with these too)."""
    model, _ = tiny
    free = per_prompt(model, prompts(), GenerateConfig(max_new_tokens=14))
    stopped = per_prompt(model, prompts(), GenerateConfig(max_new_tokens=14, stop_token_ids=stops_of(free)))
    return {"free": free, "stopped": stopped}


def test_batched_greedy_equals_per_prompt(tiny, reference):
    from post_training.inference.batched import generate_batch

    model, _ = tiny
    free = generate_batch(model, prompts(), GenerateConfig(max_new_tokens=14))
    assert free == reference["free"]
    # Rows stop at different steps (finished rows leave the cache); the others go on unchanged.
    stopped = generate_batch(model, prompts(), GenerateConfig(max_new_tokens=14, stop_token_ids=stops_of(free)))
    assert stopped == reference["stopped"]
    assert len({len(r) for r in stopped}) > 1 and min(map(len, stopped)) < 14


def test_batched_on_megatrons_attention_path(tiny, reference):
    """Without the fast paths the mask travels through megatron's own Attention.forward, with
    megatron's unrotated key format."""
    from post_training.inference.batched import generate_batch
    from post_training.runtime import fastpath

    model, _ = tiny
    fastpath.remove()
    try:
        out = generate_batch(model, prompts(), GenerateConfig(max_new_tokens=14), keys_rotated=False)
    finally:
        fastpath.apply()
    assert out == reference["free"]


def test_padded_prefill_logits_equal_unpadded(tiny):
    """Ties aside, the check behind the token equality: each row's last-position logits."""
    from post_training.inference import KVCache, stage_forward
    from post_training.inference.batched import padding_masks

    model, _ = tiny
    ps = prompts()
    length = max(map(len, ps))
    pads = torch.tensor([length - len(p) for p in ps])
    tokens = torch.tensor([[0] * (length - len(p)) + p for p in ps])
    mask, pos = padding_masks(pads, length)
    assert not mask[3, 0, :, :].diagonal().any()  # a pad query sees itself: no empty softmax row
    with torch.inference_mode():
        batched = KVCache(len(ps), length).forward(model, tokens, attention_mask=mask, position_ids=pos)
        for i, p in enumerate(ps):
            alone = stage_forward(model, torch.tensor([p]), None)[0, -1]
            torch.testing.assert_close(batched[i, -1], alone, atol=2e-5, rtol=1e-5)


def test_batched_sampling_is_seeded_and_rows_differ(tiny):
    from post_training.inference.batched import generate_batch

    model, _ = tiny
    cfg = GenerateConfig(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate_batch(model, [[5, 6, 7]] * 4, cfg, seed=3)
    assert a == generate_batch(model, [[5, 6, 7]] * 4, cfg, seed=3)
    assert len({tuple(r) for r in a}) > 1
    assert a != generate_batch(model, [[5, 6, 7]] * 4, cfg, seed=4)


def test_batched_too_long_is_refused(tiny):
    from post_training.inference.batched import generate_batch

    with pytest.raises(UsageError, match="exceeds --seq-length"):
        generate_batch(tiny[0], [[1] * 10, [2] * 3], GenerateConfig(max_new_tokens=10), max_seq_length=15)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mr_tp2", "mr_pp2"])
def test_batched_multirank_equals_tp1(layout, reference, request):
    """Every rank runs the loop; the last stage samples and broadcasts (the worker checks that
    all ranks hold the same tokens)."""
    assert request.getfixturevalue(layout)["batched"] == reference


# ----------------------------------------------------------------------------- synthesis


def test_user_turn_prefix_and_end_of_turn(tiny):
    from post_training.synthesis import end_of_turn_ids, user_turn_prefix

    tok = tiny[1]  # SmolLM2's tokenizer and ChatML template
    first = user_turn_prefix(tok, [])
    assert first.startswith("<|im_start|>system\n") and first.endswith("<|im_start|>user\n")
    history = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    later = user_turn_prefix(tok, history)
    assert later.endswith("Hello.<|im_end|>\n<|im_start|>user\n") and later.count("<|im_start|>user") == 2
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_filters_and_normalized_dedup_key():
    from post_training.synthesis import normalize, problem

    assert normalize("  What's  the BEST way,to learn?? ") == normalize("what s the best way to learn")
    ids = list(range(20))
    assert problem("How do plants grow?", ids, True, {0}, need_stop=False) == "template tokens"
    assert problem("How do plants grow?", ids[1:], True, {0}, need_stop=False) is None
    assert problem("How do plants grow?", ids[1:], False, set(), need_stop=True) == "cut off"
    assert problem(" ?! ", [5], True, set(), need_stop=True) == "empty"
    assert problem("la la la", [7, 8] * 20, True, set(), need_stop=True) == "repetitive"


def preflight(tmp_path, *args):
    from post_training.cli.synthesize import main

    return main(["--preflight", "--output", str(tmp_path / "o.jsonl"), *args])


def test_bad_input_rejected_in_preflight(tiny_llama, tmp_path):
    hf = ["--pretrained-model-path", str(tiny_llama)]
    assert preflight(tmp_path, *hf) == 0
    with pytest.raises(UsageError, match="topics file not found"):
        preflight(tmp_path, *hf, "--topics-file", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n# a comment\n")
    with pytest.raises(UsageError, match="lists no topic"):
        preflight(tmp_path, *hf, "--topics-file", str(tmp_path / "empty.txt"))
    with pytest.raises(UsageError, match="--seq-length"):
        preflight(tmp_path, *hf, "--seq-length", "64")
    with pytest.raises(UsageError, match="--output directory does not exist"):
        preflight(tmp_path / "nowhere", *hf)
    with pytest.raises(UsageError, match="--num-turns must be >= 1"):
        preflight(tmp_path, *hf, "--num-turns", "0")
    with pytest.raises(UsageError, match="--output is required"):
        from post_training.cli.synthesize import main
        main(["--preflight", *hf])


def test_script_help_and_light_preflight(tiny_llama, tmp_path):
    """synthesize.sh lists its flags; its python form compiles (torchrun runs it); the preflight
    imports neither megatron-core nor the model code (it runs before torchrun starts ranks)."""
    import subprocess

    from dist_utils import PY, ROOT, clean_env, run_script

    path = ROOT / "scripts" / "synthesize.sh"
    compile(path.read_text(), str(path), "exec")
    res = run_script("synthesize.sh", "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    for text in ("--num-conversations", "--topics-file", "--question-top-p", "--synth-batch-size",
                 "--max-new-tokens", "[env TP]", "scripts/synthesize.sh"):
        assert text in res.stdout, text
    code = ("import sys; from post_training.cli.synthesize import main; "
            f"main(['--preflight', '--pretrained-model-path', {str(tiny_llama)!r}, '--output', "
            f"{str(tmp_path / 'o.jsonl')!r}]); "
            "print(sorted(m for m in ('megatron', 'modelopt', 'post_training.model_builder') if m in sys.modules))")
    res = subprocess.run([PY, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "[]", res.stderr[-2000:]


@pytest.mark.slow
def test_synthesize_end_to_end_on_smollm2(smollm2_dir, runtime, tmp_path, capsys):
    """Two turns from seed topics with near-greedy questions (top-p 0.01): the repeated topic
    yields the same question, which dedup rejects, so the third topic fills the second slot."""
    from post_training.cli.synthesize import main

    topics = tmp_path / "topics.txt"
    topics.write_text("growing tomatoes\ngrowing tomatoes\nthe water cycle\n")
    out = tmp_path / "chat.jsonl"
    assert main(["--pretrained-model-path", str(smollm2_dir), "--output", str(out), "--topics-file",
                 str(topics), "--num-conversations", "2", "--num-turns", "2", "--synth-batch-size", "2",
                 "--question-top-p", "0.01", "--max-question-tokens", "48", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2, printed
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * 2
        assert all(m["content"].strip() for m in r["messages"])
    assert rows[0]["messages"][0]["content"].startswith("I have a question about growing tomatoes. ")
    assert rows[1]["messages"][0]["content"].startswith("I have a question about the water cycle. ")
    assert "question: duplicate 1" in printed
    assert "sequences/s" in printed and "tokens/s" in printed
