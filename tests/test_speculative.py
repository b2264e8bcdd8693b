"""Speculative generation on the tiny model: lossless against plain generate (greedy token for
token; sampling in distribution), acceptance bookkeeping, stop ids and the token budget, the
drafters, and the refusals. The TP=2 / PP=2 runs live in the shared launches (test_multirank)."""
import json
import re
import shutil

import pytest
import torch

from post_training.config import DraftConfig, GenerateConfig, ModelConfig, SourceConfig
from post_training.generate import generate, sampling_probs
from post_training.model_builder import setup_model
from post_training.speculative import ModelDrafter, NgramDrafter, build_drafter, speculative_generate
from post_training.speculative.decode import verify
from post_training.speculative.drafters import check_draft
from post_training.utils import UsageError

V = 49152
PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 911, 42]


@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    model, tok, hf_config = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    return model, tok, hf_config


class ScriptDrafter:
    """Proposes from a fixed continuation of the prompt: ``wrong`` picks positions (index in the
    answer) to propose a different token at; everything after a wrong token is proposed too."""

    def __init__(self, answer, prompt_len, wrong=lambda i: False):
        self.answer, self.prompt_len, self.wrong = answer, prompt_len, wrong
        self.calls = []

    def reset(self, prompt_ids):
        self.calls.clear()

    def propose(self, context, k):
        at = len(context) - self.prompt_len
        out = [(t + 1) % V if self.wrong(at + j) else t for j, t in enumerate(self.answer[at:at + k])]
        self.calls.append(len(out))
        return out

    def accept(self, n, context):
        pass


def test_oracle_drafter_accepts_everything(tiny):
    model, _, _ = tiny
    g = GenerateConfig(max_new_tokens=24)
    ref = generate(model, PROMPT, g)
    for k in (1, 3, 5):
        out, st = speculative_generate(model, PROMPT, ScriptDrafter(ref, len(PROMPT)), g, k)
        assert out == ref
        assert st.acceptance_length == pytest.approx(k + 1)  # 24 = 4 * 6 = 6 * 4 = 2 * 12
        assert st.accepted == st.drafted == [k] * (24 // (k + 1)) and st.acceptance_rate(k) == 1.0


def test_wrong_drafter_rolls_back_to_plain_output(tiny):
    """Every draft rejected (AL 1), every third rejected, rejections at varying depths: each
    rollback then continuing gives exactly the output of never drafting."""
    model, _, _ = tiny
    g = GenerateConfig(max_new_tokens=20)
    ref = generate(model, PROMPT, g)
    out, st = speculative_generate(model, PROMPT, ScriptDrafter(ref, len(PROMPT), lambda i: True), g, 4)
    assert out == ref and st.acceptance_length == 1.0 and set(st.accepted) == {0} and st.steps == 20
    out, st = speculative_generate(model, PROMPT, ScriptDrafter(ref, len(PROMPT), lambda i: i % 3 == 2), g, 4)
    assert out == ref and 1.0 < st.acceptance_length < 5 and max(st.accepted) == 2
    none, st = speculative_generate(model, PROMPT, None, g, 4)
    assert none == ref and st.steps == 20


def test_stop_id_mid_accepted_run_and_exact_budget(tiny):
    model, _, _ = tiny
    ref = generate(model, PROMPT, GenerateConfig(max_new_tokens=16))
    stop = next(t for i, t in enumerate(ref) if i >= 5 and t not in ref[:i])  # first occurrence at i
    i = ref.index(stop)
    g = GenerateConfig(max_new_tokens=16, stop_token_ids=[stop])
    out, st = speculative_generate(model, PROMPT, ScriptDrafter(ref, len(PROMPT)), g, 7)
    assert out == ref[:i + 1] == generate(model, PROMPT, g) and st.tokens == i + 1
    for n in (1, 2, 9, 10, 11):  # never more than --max-new-tokens, whatever K
        out, _ = speculative_generate(model, PROMPT, ScriptDrafter(ref, len(PROMPT)), GenerateConfig(max_new_tokens=n), 4)
        assert out == ref[:n]


def test_ngram_and_model_drafters_match_plain_greedy(tiny, tiny_llama, tmp_path_factory, smollm2_dir, runtime):
    model, tok, hf_config = tiny
    g = GenerateConfig(max_new_tokens=32)
    ref = generate(model, PROMPT, g)
    out, st = speculative_generate(model, PROMPT, NgramDrafter(3), g, 3)
    assert out == ref and sum(st.drafted) > 0 and st.acceptance_length > 1.0
    # The target itself as its own draft model: lossless and (chunk vs step numerics aside) all kept.
    same = ModelDrafter(model)
    out, st = speculative_generate(model, PROMPT, same, g, 3)
    assert out == ref and st.acceptance_length > 3.5
    # Another (2-layer, other weights) model of the same tokenizer, built from its flags.
    from conftest import make_tiny

    other = make_tiny(tmp_path_factory.mktemp("draft") / "d", "llama", smollm2_dir, layers=2, seed=7)
    drafter = build_drafter(DraftConfig(draft="model", draft_model_path=str(other)), tok, hf_config,
                            runtime, ModelConfig())
    assert isinstance(drafter, ModelDrafter) and drafter.model.config.num_layers == 2
    for prompt in (PROMPT, [17, 18, 19]):
        ref = generate(model, prompt, g)
        out, st = speculative_generate(model, prompt, drafter, g, 4)  # the drafter is reused
        assert out == ref and all(d > 0 for d in st.drafted[:-1])


def test_ngram_proposals():
    """Longest suffix first, latest occurrence followed by k tokens; a match on the last token
    alone proposes weak_match_tokens tokens."""
    ctx = [1, 2, 3, 9, 9, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    assert NgramDrafter(3).propose(ctx, 2) == [4, 5]  # latest full match of [1, 2, 3]
    assert NgramDrafter(3).propose(ctx, 3) == [4, 5, 1]
    weak = [7, 8, 5, 6, 0, 1, 2, 5]  # only the last token (5) recurs
    assert NgramDrafter(3).propose(weak, 3) == [6]
    assert NgramDrafter(3, weak_match_tokens=3).propose(weak, 3) == [6, 0, 1]
    assert NgramDrafter(3, min_ngram_size=2).propose(weak, 3) == []
    assert NgramDrafter(3).propose([4, 5, 6], 3) == []
    with pytest.raises(ValueError):
        NgramDrafter(3, weak_match_tokens=0)


def test_plain_draw_sequence_when_nothing_is_drafted(tiny):
    """Sampling without proposals draws exactly as generate does (same seed, same tokens)."""
    model, _, _ = tiny
    g = GenerateConfig(max_new_tokens=12, temperature=1.2, top_k=50)
    for seed in (1, 2):
        out, _ = speculative_generate(model, PROMPT, None, g, 3, seed=seed)
        assert out == generate(model, PROMPT, g, seed=seed)


def _tv(counts: dict, probs: dict, n: int) -> float:
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)


def test_verify_draws_from_p_for_any_proposal():
    """Speculative sampling's output token (first slot) is distributed as p whatever the proposal:
    one-hot q on a likely token, on an unlikely one, and a sampled q (its own q). 6000 draws per
    case over 8 outcomes: the total-variation distance to p stays below 0.04 (its sd is ~0.01),
    while always keeping the draft would be off by > 0.3."""
    cfg = GenerateConfig(temperature=1.0, top_k=6)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]] * 2)
    p = sampling_probs(logits[0], cfg)
    probs = {i: float(p[i]) for i in range(8)}
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.2, 0.2, 0.1, 0.2])
    n = 6000
    for draft_of, qs in ((lambda: 0, None), (lambda: 4, None), (lambda: int(torch.multinomial(q, 1, generator=gen)), q)):
        counts: dict = {}
        for _ in range(n):
            x = draft_of()
            tok = verify(logits, [x], cfg, gen, qs.unsqueeze(0) if qs is not None else None)[0]
            counts[tok] = counts.get(tok, 0) + 1
        assert _tv(counts, probs, n) < 0.04, counts
        assert counts.get(7, 0) == 0  # outside top-k: never, even when proposed with q > 0
    assert _tv({0: n}, probs, n) > 0.3


def _chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pearson's chi-square goodness of fit; cells expecting < 5 draws pooled into one."""
    from scipy.stats import chisquare

    big = [k for k in probs if probs[k] * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [probs[k] * n for k in big] + [n - sum(probs[k] * n for k in big)]
    if exp[-1] < 1e-9:
        assert obs[-1] == 0, "draws outside the support"
        obs, exp = obs[:-1], exp[:-1]
    total = sum(exp)  # fp32 probabilities: rescale so the sums agree exactly
    return float(chisquare(obs, [e * sum(obs) / total for e in exp]).pvalue)


def test_sampled_tokens_follow_plain_sampling(tiny):
    """The first two generated tokens of speculative sampling (drafter: the greedy answer, so
    drafts are kept and rejected) against their exact joint distribution under plain sampling,
    computed from the model's logits: chi-square goodness of fit over 300 seeds, p > 0.001.
    Keeping every draft, or drawing a rejection from p instead of the residual, fails it."""
    model, _, _ = tiny
    g = GenerateConfig(max_new_tokens=2, temperature=1.0, top_k=4)
    ref = generate(model, PROMPT, GenerateConfig(max_new_tokens=2))
    from post_training.inference import stage_forward

    exact = {}
    with torch.inference_mode():
        p1 = sampling_probs(stage_forward(model, torch.tensor([PROMPT]), None)[0, -1], g)
        for a in torch.nonzero(p1).flatten().tolist():
            p2 = sampling_probs(stage_forward(model, torch.tensor([PROMPT + [a]]), None)[0, -1], g)
            exact.update({(a, b): float(p1[a] * p2[b]) for b in torch.nonzero(p2).flatten().tolist()})
    n, counts, kept = 300, {}, 0
    for seed in range(n):
        out, st = speculative_generate(model, PROMPT, ScriptDrafter(ref, len(PROMPT)), g, 1, seed=seed)
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        kept += st.accepted[0]
    assert 0 < kept < n  # both branches of the accept test ran
    assert _chi2_pvalue(counts, exact, n) > 1e-3, (counts, exact)
    # The test has power: the draft kept every time (no accept test) is far off.
    biased = {(ref[0], b): float(v) / float(p1[ref[0]]) for (a, b), v in exact.items() if a == ref[0]}
    assert _chi2_pvalue({k: round(v * n) for k, v in biased.items()}, exact, n) < 1e-6


def test_refusals(tiny, tiny_llama, tmp_path):
    _, tok, hf_config = tiny
    with pytest.raises(UsageError, match="--draft-steps must be >= 1"):
        DraftConfig(draft="ngram", draft_steps=0)
    with pytest.raises(UsageError, match=r"--draft eagle needs a trained draft head: --draft-model-path DIR"):
        build_drafter(DraftConfig(draft="eagle"), tok, hf_config)
    assert build_drafter(DraftConfig(), tok, hf_config) is None
    # A draft of another vocabulary size, and one whose tokenizer maps ids differently.
    d = tmp_path / "vocab"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 50000}))
    with pytest.raises(UsageError, match="vocabulary"):
        check_draft(DraftConfig(draft="model", draft_model_path=str(d)), tok, hf_config)
    d2 = tmp_path / "tok"
    shutil.copytree(tiny_llama, d2)
    tj = json.loads((d2 / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[1000:1002]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d2 / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UsageError, match="tokenizer differs"):
        check_draft(DraftConfig(draft="model", draft_model_path=str(d2)), tok, hf_config)
    with pytest.raises(UsageError, match=r"draft model: PP=3 must divide the number of layers \(4\)"):
        check_draft(DraftConfig(draft="model", draft_model_path=str(tiny_llama)), tok, hf_config, 1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["mr_tp2", "mr_pp2"])
def test_tp2_and_pp2_match_tp1(layout, request, tiny, tiny_llama):
    """At TP=2 and PP=2 (the shared launches): every rank returns the same tokens, and the n-gram
    and model drafters give exactly TP=1's plain greedy output."""
    ranks = request.getfixturevalue(layout)["spec"]["ranks"]
    assert all(r == ranks[0] for r in ranks[1:])
    res = ranks[0]
    ref = generate(tiny[0], res["prompt"], GenerateConfig(max_new_tokens=24))
    assert res["plain"] == res["ngram"]["tokens"] == res["model"]["tokens"] == ref
    assert sum(res["ngram"]["accepted"]) > 0 and sum(res["model"]["accepted"]) >= 3 * len(res["model"]["accepted"]) - 2
    assert len(res["sampled"]) == 16
    # Random heads at this layout: lossless, and the same proposals as at TP=1 (tests/test_eagle_draft.py).
    from post_training.speculative.eagle_draft import build_head
    from post_training.speculative.head_layout import HeadConfig, head_config_for, random_head_state
    from post_training.speculative.head_drafter import head_drafter

    tcfg = json.loads((tiny_llama / "config.json").read_text())
    for kind, dv in (("eagle3", 4096), ("eagle1", None), ("medusa", None)):
        assert res[kind]["tokens"] == ref, kind
        cfg = head_config_for(tcfg, kind, dv)
        drafter = head_drafter(build_head(HeadConfig.from_hf(cfg), random_head_state(cfg, seed=1)), tiny[0])
        st = speculative_generate(tiny[0], res["prompt"], drafter, GenerateConfig(max_new_tokens=24), 3)[1]
        assert res[kind]["accepted"] == st.accepted and res[kind]["drafted"] == st.drafted, kind


def test_generate_entry_point_drafts_and_refuses(tiny_llama, runtime, tmp_path, capsys):
    """generate.sh's entry point with --draft ngram answers exactly as without it and reports
    tok/s, target steps and AL; what it cannot honour is refused before any model loads."""
    from post_training.cli import generate as cli

    base = ["--pretrained-model-path", str(tiny_llama), "--max-new-tokens", "12"]
    assert cli.main(base + ["--json-out", str(tmp_path / "plain.json")]) == 0
    capsys.readouterr()
    assert cli.main(base + ["--draft", "ngram", "--draft-steps", "2", "--json-out", str(tmp_path / "spec.json")]) == 0
    out = capsys.readouterr().out
    plain, spec = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "spec.json"))
    assert [r["tokens"] for r in plain] == [r["tokens"] for r in spec]
    assert "target steps, AL" in out and "speculative (ngram, K=2):" in out
    for extra, needle in ((["--draft", "eagle"], "--draft eagle needs a trained draft head: --draft-model-path DIR"),
                          (["--draft", "model", "--draft-model-path", str(tiny_llama),
                            "--transformer-impl", "transformer_engine"], "--draft needs the local layer spec")):
        with pytest.raises(UsageError, match=re.escape(needle)):
            cli.main(base + extra + ["--preflight"])
