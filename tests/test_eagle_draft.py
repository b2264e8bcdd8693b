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
from post_training.speculative.eagle_draft import build_head, load_draft_head, save_draft_head
from post_training.speculative.head_layout import HeadConfig, head_config_for, random_head_state
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


# ----------------------------------------------------------------------------- ModelOpt agreement


@pytest.mark.parametrize("kind", ["eagle3", "eagle1", "medusa"])
def test_native_head_equals_modelopt(tiny, tiny_llama, runtime, kind, tmp_path):
    """The guarantee that training and inference agree: a head converted by ModelOpt's megatron
    plugin (as scripts/eagle3.sh trains it), exported to the layout, drafts in the native head
    with ModelOpt's own draft logits: one step over the whole context and each step of the
    chain (``pseudo_speculative_generate``), and the same draft tokens. The head goes through
    the training side's ``draft_head_state`` and this side's save / load."""
    from post_training.config import DraftTrainConfig
    from post_training.speculative.head_state import draft_head_state
    from post_training.speculative.heads import convert_model

    target, _, tcfg = tiny
    model, _, hfc = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime,
                                inference=False)
    torch.manual_seed(0)
    d2t = None
    if kind == "eagle3":  # a draft vocabulary of every 3rd id
        d2t = torch.arange(4096) * 3 - torch.arange(4096)
    model = convert_model(model, DraftTrainConfig(algorithm=kind, draft_vocab_size=4096 if d2t is not None else None),
                          hfc, runtime, d2t=d2t)
    model.eval()
    with torch.no_grad():  # random heads are near-flat: larger weights make the argmax meaningful
        for n, prm in model.named_parameters():
            if n.startswith(("eagle_module.", "medusa_heads.")) and prm.dim() == 2:
                prm.normal_(0, 0.2)
    cfg, state = draft_head_state(model)
    drafter = head_drafter(load_draft_head(save_draft_head(cfg, state, tmp_path / kind)), target)
    ids = PROMPT
    hidden = _uncached_hidden(target, ids, drafter.hidden_spec)
    if kind == "medusa":
        with torch.no_grad():  # ModelOpt's MedusaHead forward on the final-normed hidden
            final = hidden[-1]
            theirs = torch.stack([head(final.view(1, 1, -1))[0].view(-1) for head in model.medusa_heads])
        ours = drafter.head.logits(final, len(model.medusa_heads))
        torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)
        return
    outs = []
    out_layer = model.eagle_module.eagle_output_layer if kind == "eagle3" else model.output_layer
    handle = out_layer.register_forward_hook(lambda m, a, o: outs.append(o[0].detach().clone()))
    with torch.no_grad():
        base, drafts = model.pseudo_speculative_generate(torch.tensor([ids]), steps=3)
    handle.remove()
    theirs = [o[:, 0] for o in outs[(kind == "eagle1"):]]  # EAGLE-1 shares the target's output layer
    context = ids + [int(base)]
    drafter.reset(context)
    drafter.feed_hidden(hidden, 0)
    # One step over the whole context: entry i = (hidden i, token i + 1).
    logits, _ = drafter.head.append(drafter.embedding[torch.tensor(context[1:])], drafter.head.project(hidden))
    torch.testing.assert_close(logits, theirs[0][:len(ids)].float(), atol=1e-4, rtol=1e-4)
    # The chain: the drafter's proposals are ModelOpt's draft tokens, step logits compared too.
    drafter.head.truncate(0)
    assert drafter.propose(context, 3) == drafts[0].tolist()
    chain = []
    drafter.head.truncate(0)
    logits, nxt = drafter.head.append(drafter.embedding[torch.tensor(context[1:])], drafter.head.project(hidden))
    for step in range(3):
        chain.append(logits[-1])
        tok = int(drafter.head.to_target(logits[-1].argmax()))
        logits, nxt = drafter.head.append(drafter.embedding[tok].unsqueeze(0), nxt[-1:])
    for step in range(3):
        torch.testing.assert_close(chain[step], theirs[step][len(ids) - 1 + step].float(), atol=1e-4, rtol=1e-4)


def test_export_writes_the_target_and_the_draft_head(tiny, tiny_llama, runtime, tmp_path):
    """A model carrying a trained ModelOpt head exports the target as always plus the head in
    <EXPORT_DIR>/eagle3_draft, which --draft eagle --draft-model-path reads; lossless."""
    from post_training.config import DraftTrainConfig, ExportConfig
    from post_training.export import export_model
    from post_training.speculative.head_state import draft_head_state
    from post_training.speculative.heads import convert_model

    target, tok, tcfg = tiny
    model, _, hfc = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime,
                                inference=False)
    model = convert_model(model, DraftTrainConfig(algorithm="eagle3", draft_vocab_size=4096), hfc, runtime,
                          d2t=torch.arange(4096) * 2 - torch.arange(4096))
    model.eval()
    out = export_model(model, runtime, tiny_llama, ExportConfig(export_dir=str(tmp_path / "exp")), torch.float32)
    assert (out / "config.json").is_file() and (out / "eagle3_draft" / "model.safetensors").is_file()
    cfg, state = draft_head_state(model)
    back = load_draft_head(out / "eagle3_draft")
    assert set(back.state) == set(state) and all(torch.equal(back.state[k], state[k]) for k in state)
    drafter = build_drafter(DraftConfig(draft="eagle", draft_model_path=str(out / "eagle3_draft")), tok, tcfg,
                            target=target)
    assert speculative_generate(target, PROMPT, drafter, G, 3)[0] == generate(target, PROMPT, G)


def test_draft_from_the_load_checkpoint(tiny, tiny_llama, runtime, tmp_path):
    """--draft eagle without --draft-model-path: the head a --load checkpoint carries (saved
    with its ModelOpt state, as scripts/eagle3.sh does); the target then decodes as the plain
    model (its KV-cache forward, no ModelOpt training forward): lossless, and the head drafts as
    its exported copy."""
    from post_training.checkpointing.save import save_checkpoint
    from post_training.config import DraftTrainConfig
    from post_training.speculative.head_state import draft_head_state
    from post_training.speculative.heads import convert_model

    target, tok, tcfg = tiny
    model, _, hfc = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime,
                                inference=False)
    model = convert_model(model, DraftTrainConfig(algorithm="eagle3", draft_vocab_size=4096), hfc, runtime,
                          d2t=torch.arange(4096) * 2 - torch.arange(4096))
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if n.startswith("eagle_module.") and prm.dim() == 2:
                prm.normal_(0, 0.2)
    exported = save_draft_head(*draft_head_state(model), tmp_path / "head")
    ckpt = save_checkpoint(model, runtime, tmp_path / "ckpt", 1, hf_dir=tiny_llama)
    src = SourceConfig(load=str(tmp_path / "ckpt"), pretrained_model_path=str(tiny_llama))
    loaded, _, _ = setup_model(src, ModelConfig(), runtime, hf_dir=tiny_llama)
    # Plain generation from such a checkpoint decodes as the target (not ModelOpt's training forward).
    assert generate(loaded, PROMPT, G) == generate(target, PROMPT, G)
    drafter = build_drafter(DraftConfig(draft="eagle"), tok, tcfg, target=loaded, load=src.load)
    out, st = speculative_generate(loaded, PROMPT, drafter, G, 3)
    assert out == generate(target, PROMPT, G)
    ref = speculative_generate(target, PROMPT, head_drafter(load_draft_head(exported), target), G, 3)[1]
    assert st.accepted == ref.accepted and st.drafted == ref.drafted
    with pytest.raises(UsageError, match="the --load checkpoint.s head is eagle, not medusa"):
        check_draft(DraftConfig(draft="medusa"), tok, tcfg, load=src.load)
    assert ckpt.exists()


def test_generate_and_acceptance_entry_points_with_a_head(tiny, tiny_llama, runtime, tmp_path, capsys):
    """generate.sh / acceptance.sh entry points with --draft eagle --draft-model-path: the same
    answers as without a drafter, AL reported; a head made for another target is refused at
    --preflight."""
    from post_training.cli import acceptance as acc_cli
    from post_training.cli import generate as gen_cli

    _, _, tcfg = tiny
    cfg, state = _head(tcfg, "eagle3", 4096)
    head = save_draft_head(cfg, state, tmp_path / "head")
    base = ["--pretrained-model-path", str(tiny_llama), "--max-new-tokens", "10"]
    assert gen_cli.main(base + ["--json-out", str(tmp_path / "plain.json")]) == 0
    assert gen_cli.main(base + ["--draft", "eagle", "--draft-model-path", str(head), "--json-out",
                                str(tmp_path / "spec.json")]) == 0
    plain, spec = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "spec.json"))
    assert [r["tokens"] for r in plain] == [r["tokens"] for r in spec]
    assert "speculative (eagle, K=3)" in capsys.readouterr().out
    assert acc_cli.main(["--pretrained-model-path", str(tiny_llama), "--draft", "eagle", "--draft-model-path",
                         str(head), "--osl", "6", "--num-prompts", "1", "--categories", "math"]) == 0
    assert "average AL" in capsys.readouterr().out
    other = dict(cfg, vocab_size=32000)
    bad = save_draft_head(other, random_head_state(other), tmp_path / "other")
    with pytest.raises(UsageError, match="vocabulary 32000 != the target's 49152"):
        gen_cli.main(base + ["--draft", "eagle", "--draft-model-path", str(bad), "--preflight"])
