"""Trained-head drafters (EAGLE-3, EAGLE-1, Medusa) on the tiny model: lossless with random heads,
the target hidden states they read, the draft KV rollback, the HF layout round trip, refusals.
TP=2 / PP=2 runs live in the shared launches (tests/workers/spec.py)."""
import json

import pytest
import torch

from post_training.config import DraftConfig, GenerateConfig, ModelConfig, SourceConfig
from post_training.generate import generate
from post_training.inference import KVCache
from post_training.inference.hidden import HiddenCapture, HiddenSpec
from post_training.model_builder import setup_model
from post_training.speculative import build_drafter, speculative_generate
from post_training.speculative.drafters import check_draft
from post_training.speculative.eagle_draft import (HeadConfig, build_head, head_config_for, load_draft_head,
                                                   random_head_state, save_draft_head)
from post_training.speculative.head_drafter import head_drafter
from post_training.utils import UsageError

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 911, 42]
G = GenerateConfig(max_new_tokens=24)


@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    model, tok, hf_config = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    return model, tok, json.loads((tiny_llama / "config.json").read_text())


def _head(tcfg, kind, draft_vocab=None, seed=1, **over):
    cfg = head_config_for(tcfg, kind, draft_vocab, **over)
    return cfg, random_head_state(cfg, seed=seed)


class Recorder:
    """Wraps a drafter and records (context, proposal) of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.hidden_spec, self.draft_probs = inner.hidden_spec, None

    def reset(self, p):
        self.inner.reset(p)

    def feed_hidden(self, rows, start):
        self.inner.feed_hidden(rows, start)

    def propose(self, context, k):
        out = self.inner.propose(context, k)
        self.calls.append((list(context), list(out)))
        return out

    def accept(self, n, context):
        self.inner.accept(n, context)


@pytest.mark.parametrize("kind,draft_vocab", [("eagle3", 4096), ("eagle3", None), ("eagle1", None), ("medusa", None)])
def test_random_head_is_lossless(tiny, kind, draft_vocab):
    """Any head only proposes; the target verifies: greedy output == plain greedy."""
    model, _, tcfg = tiny
    ref = generate(model, PROMPT, G)
    drafter = head_drafter(build_head(HeadConfig.from_hf(_head(tcfg, kind, draft_vocab)[0]),
                                      _head(tcfg, kind, draft_vocab)[1]), model)
    out, st = speculative_generate(model, PROMPT, drafter, G, 3)
    assert out == ref
    assert max(st.drafted) == 3 and st.tokens == 24


def _uncached_hidden(model, ids, spec):
    cache = KVCache(1, len(ids) + 1)
    with torch.inference_mode(), HiddenCapture(model, spec) as cap:
        cache.forward(model, torch.tensor([ids]))
        return cap.result(len(ids), 1)[:, 0].float()


def test_hidden_capture_matches_hf_and_uncached(tiny, tiny_llama):
    """Aux layers = OUTPUTS of 0-based layers (HF hidden_states[i + 1]); final = after the norm;
    the cached prefill + verify chunks give the one-shot forward's rows."""
    from transformers import AutoModelForCausalLM

    model, _, tcfg = tiny
    spec = HiddenSpec(layers=(0, 1, 2), final=True)
    ids = PROMPT + [100, 200, 300]
    one = _uncached_hidden(model, ids, spec)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = tcfg["hidden_size"]
    want = torch.cat([hs[1][0], hs[2][0], hs[3][0], hs[-1][0]], dim=-1)
    assert one.shape == (len(ids), 4 * h)
    torch.testing.assert_close(one, want, atol=2e-2, rtol=2e-2)
    cache = KVCache(1, len(ids))
    rows = []
    with torch.inference_mode():
        for chunk in (ids[:9], ids[9:13], ids[13:]):  # prefill, a 4-token verify, a decode step
            with HiddenCapture(model, spec) as cap:
                cache.forward(model, torch.tensor([chunk]), all_logits=True)
            rows.append(cap.result(len(chunk), 1)[:, 0].float())
    torch.testing.assert_close(torch.cat(rows), one, atol=1e-4, rtol=1e-4)


def test_draft_kv_rollback_matches_fresh_drafter(tiny):
    """Every proposal of the speculative loop (rejected chains truncated, real hiddens appended)
    equals the proposal of a fresh drafter given the one-shot hiddens of the same context."""
    model, _, tcfg = tiny
    cfg, state = _head(tcfg, "eagle3", 4096, seed=3)
    rec = Recorder(head_drafter(build_head(HeadConfig.from_hf(cfg), state), model))
    out, st = speculative_generate(model, PROMPT, rec, G, 3)
    assert out == generate(model, PROMPT, G)
    fresh = head_drafter(build_head(HeadConfig.from_hf(cfg), state), model)
    checked = 0
    for context, proposal in rec.calls[::4]:
        fresh.reset(context)
        fresh.feed_hidden(_uncached_hidden(model, context[:-1], fresh.hidden_spec), 0)
        assert fresh.propose(context, len(proposal)) == proposal, context
        checked += 1
    assert checked >= 4


def test_save_load_round_trip(tiny, tmp_path):
    """save_draft_head -> load_draft_head: the same config and bit-identical tensors, the same
    drafts; build_drafter reads the directory."""
    model, tok, tcfg = tiny
    for kind in ("eagle3", "medusa"):
        cfg, state = _head(tcfg, kind, 4096 if kind == "eagle3" else None)
        d = save_draft_head(cfg, state, tmp_path / kind)
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
        back = load_draft_head(d)
        assert back.cfg == HeadConfig.from_hf(cfg)
        assert set(back.state) == set(state)
        assert all(torch.equal(back.state[k], state[k]) and back.state[k].dtype == state[k].dtype for k in state)
        a = speculative_generate(model, PROMPT, head_drafter(build_head(HeadConfig.from_hf(cfg), state), model), G, 3)[1]
        drafter = build_drafter(DraftConfig(draft="eagle" if kind == "eagle3" else "medusa", draft_model_path=str(d)),
                                tok, tcfg, target=model)
        b = speculative_generate(model, PROMPT, drafter, G, 3)[1]
        assert a.accepted == b.accepted and a.drafted == b.drafted


def test_refusals(tiny, tmp_path):
    model, tok, tcfg = tiny
    with pytest.raises(UsageError, match="--draft eagle needs a trained draft head"):
        check_draft(DraftConfig(draft="eagle"), tok, tcfg)
    cfg, state = _head(tcfg, "eagle3", 4096)
    # Another target: hidden size, vocabulary.
    for field, val, needle in (("hidden_size", 128, "hidden size 128 != the target's 64"),
                               ("vocab_size", 32000, "vocabulary 32000 != the target's 49152")):
        other = dict(cfg, **{field: val})
        d = save_draft_head(other, random_head_state(other, seed=0), tmp_path / field)
        with pytest.raises(UsageError, match=needle):
            check_draft(DraftConfig(draft="eagle", draft_model_path=str(d)), tok, tcfg)
    # d2t inconsistent with draft_vocab_size, or mapping outside the vocabulary; a missing tensor.
    bad = dict(state, d2t=state["d2t"][:-1])
    with pytest.raises(UsageError, match="d2t has 4095 entries, draft_vocab_size is 4096"):
        save_draft_head(cfg, bad, tmp_path / "bad")
    bad = dict(state, d2t=state["d2t"] + 49152)
    with pytest.raises(UsageError, match="d2t maps draft ids outside the target vocabulary"):
        save_draft_head(cfg, bad, tmp_path / "bad")
    with pytest.raises(UsageError, match="tensor fc.weight missing"):
        save_draft_head(cfg, {k: v for k, v in state.items() if k != "fc.weight"}, tmp_path / "bad")
    # A Medusa directory for --draft eagle; a directory without a head.
    mcfg, mstate = _head(tcfg, "medusa")
    d = save_draft_head(mcfg, mstate, tmp_path / "medusa")
    with pytest.raises(UsageError, match="holds a medusa head"):
        check_draft(DraftConfig(draft="eagle", draft_model_path=str(d)), tok, tcfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="config.json not found"):
        check_draft(DraftConfig(draft="eagle", draft_model_path=str(tmp_path / "empty")), tok, tcfg)
    # A head file edited after export: its shapes no longer match its config.
    d = save_draft_head(cfg, state, tmp_path / "edited")
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(UsageError, match="has shape .* the config implies"):
        load_draft_head(d)
