"""SFT data: the three chat formats give the same tokens, the loss covers exactly the
assistant replies, packing keeps documents whole (positions / attention reset per document),
the order is a function of (seed, consumed samples), bad inputs are one-line errors, and a
packed document's per-token loss equals that of the document alone (tiny model)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from post_training.chat_data import (
    build_sft_datasets,
    global_batches,
    packed_attention_mask,
    tokenize_conversation,
)
from post_training.config import BatchConfig, SFTDataConfig
from post_training.utils import UsageError

CONVS = [
    [{"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And three plus three?"},
     {"role": "assistant", "content": "Six, of course."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from post_training.hf import load_tokenizer

    return load_tokenizer(smollm2_dir)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft(files, **kw):
    return SFTDataConfig(data_files=files, valid_fraction=kw.pop("valid_fraction", 0.0), **kw)


def masked_text(tok, sample):
    return tok.decode(sample["tokens"][sample["loss_mask"].bool()])


def test_loss_mask_covers_exactly_the_assistant_replies(tok):
    for msgs in CONVS:
        ids, mask = tokenize_conversation(msgs, tok)
        assert ids == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
        replies = [m["content"] for m in msgs if m["role"] == "assistant"]
        # SmolLM2's template ends a turn with "<|im_end|>\n": the reply and its stop token
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(
            r + "<|im_end|>\n" for r in replies)
        ids_all, mask_all = tokenize_conversation(msgs, tok, all_tokens=True)
        assert ids_all == ids and mask_all == [0] + [1] * (len(ids) - 1)


def test_formats_agree(tok, tmp_path):
    """OpenAI messages (jsonl), ShareGPT (json), prompt/response (parquet), Alpaca
    instruction/input/output: the same single-turn chat gives the same sample."""
    user, reply = "Translate 'cat' to French.", "Chat."
    files = {
        "messages": jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": user},
                                                               {"role": "assistant", "content": reply}]}]),
        "sharegpt": str(tmp_path / "s.json"),
        "pair": str(tmp_path / "p.parquet"),
        "alpaca": jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate 'cat'", "input": "to French.",
                                               "output": reply}]),
    }
    (tmp_path / "s.json").write_text(json.dumps([{"id": 1, "conversations": [
        {"from": "human", "value": user}, {"from": "gpt", "value": reply}]}]))
    pq.write_table(pa.table({"prompt": [user], "response": [reply]}), files["pair"])
    samples = {k: build_sft_datasets(sft(f, pack=False), tok, 64, seed=1)[0][0] for k, f in files.items()}
    ref = samples["messages"]
    assert masked_text(tok, ref) == reply + "<|im_end|>\n"
    for k in ("sharegpt", "pair"):
        assert torch.equal(samples[k]["tokens"], ref["tokens"]), k
        assert torch.equal(samples[k]["loss_mask"], ref["loss_mask"]), k
    assert "Translate 'cat'\n\nto French." in tok.decode(samples["alpaca"]["tokens"])
    # a named field: prompt,response pair given explicitly
    named = build_sft_datasets(sft(files["pair"], pack=False, field="prompt,response"), tok, 64, 1)[0]
    assert torch.equal(named[0]["tokens"], ref["tokens"])


def test_packing_truncation_and_resets(tok, tmp_path, capsys, runtime):
    from post_training.training import collate

    long = [{"role": "user", "content": "Tell me a story."},
            {"role": "assistant", "content": "Once upon a time " * 40}]
    f = jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in CONVS * 3 + [long]])
    lens = [len(tokenize_conversation(m, tok)[0]) for m in CONVS]
    s = 2 * max(lens) + 5  # room for two documents
    train, _ = build_sft_datasets(sft(f, reset_position_ids=True, reset_attention_mask=True),
                                  tok, s, seed=3)
    out = capsys.readouterr().out
    assert "7 conversations" in out and f"1 longer than {s + 1} tokens truncated" in out
    assert train.num_documents == 7 and len(train) < 7 and train.tokens.shape[1] == s + 1
    seen = 0
    for i in range(len(train)):
        x = train[i]
        doc = x["document_ids"]
        for d in doc.unique().tolist():
            where = (doc == d).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous, whole
            if d >= 0:  # positions restart at each document; its first token is no target
                assert torch.equal(x["position_ids"][where], torch.arange(len(where)))
                assert x["loss_mask"][where[0]] == 0
                seen += 1
            else:
                assert x["loss_mask"][where].sum() == 0  # padding is never a target
    assert seen == 7
    # the truncated document fills a whole sample and still has assistant tokens
    assert (train.doc_ids == 0).all(dim=1).any()
    mbs = collate([train[i] for i in range(2)], BatchConfig(micro_batch_size=1, global_batch_size=2),
                  runtime)
    m = mbs[0]["attention_mask"]
    doc = train[0]["document_ids"]
    assert m.shape == (1, 1, s, s) and m.dtype == torch.bool
    assert torch.equal(~m[0, 0], (doc[:, None] == doc[None, :]) & torch.ones(s, s, dtype=torch.bool).tril())
    assert torch.equal(mbs[1]["position_ids"][0], train[1]["position_ids"])
    # no packing: one conversation a sample, no mask
    single, _ = build_sft_datasets(sft(f, pack=False), tok, s, seed=3)
    assert len(single) == 7 and "document_ids" not in single[0]


def test_order_is_a_function_of_seed_and_consumed_samples(tok):
    train, valid = build_sft_datasets(SFTDataConfig(valid_fraction=0.1), tok, 128, seed=7)
    assert valid is not None and len(valid) >= 1
    n = len(train)

    def keys(batches, k):
        return [tuple(x["tokens"].tolist()) for b in (next(batches) for _ in range(k)) for x in b]

    run = keys(global_batches(train, 3, 0), 2 * n)  # six epochs of samples
    assert keys(global_batches(train, 3, 9), 2 * n - 3) == run[9:]  # resume mid-epoch
    epochs = [run[e * n:(e + 1) * n] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]  # reshuffled
    assert len(set(epochs[0])) == n  # each sample once per epoch
    again, _ = build_sft_datasets(SFTDataConfig(valid_fraction=0.1), tok, 128, seed=7)
    assert keys(global_batches(again, 3, 0), 4) == run[:12]
    other, _ = build_sft_datasets(SFTDataConfig(valid_fraction=0.1), tok, 128, seed=8)
    assert keys(global_batches(other, 3, 0), 4) != run[:12]
    assert build_sft_datasets(SFTDataConfig(valid_fraction=0.0), tok, 128, seed=7)[1] is None


def test_bad_inputs_are_one_line_errors(tok, tmp_path):
    cases = [
        (jsonl(tmp_path / "u.jsonl", [{"text": "a", "label": 1}]), {},
         "cannot tell the chat format.*columns text, label"),
        (jsonl(tmp_path / "f.jsonl", [{"messages": CONVS[0]}]), {"field": "chat"},
         "'chat' is not a column.*columns: messages"),
        (jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), {},
         "no assistant tokens"),
        (jsonl(tmp_path / "g.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}]), {},
         "unknown ShareGPT speaker 'robot'"),
        (str((tmp_path / "e.jsonl").touch() or tmp_path / "e.jsonl"), {}, "is empty"),
    ]
    for f, kw, match in cases:
        with pytest.raises(UsageError, match=match) as e:
            build_sft_datasets(sft(f, **kw), tok, 64, seed=0)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="not found"):
        sft(str(tmp_path / "missing.jsonl"))


def test_packed_document_loss_equals_the_document_alone(tiny_llama, runtime, tmp_path):
    """With both resets, the second document of a packed sample gets the per-token losses it
    gets alone; with a plain causal mask it does not (it sees the first document), which shows
    that the model honours the attention mask."""
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model
    from post_training.training import collate

    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)),
                                ModelConfig(seq_length=128), runtime, inference=False)
    model.eval()
    f = jsonl(tmp_path / "two.jsonl", [{"messages": m} for m in CONVS])
    a, b = (tokenize_conversation(m, tok)[0] for m in CONVS)
    s = len(a) + len(b) + 3
    cfg = sft(f, reset_position_ids=True, reset_attention_mask=True)
    packed, _ = build_sft_datasets(cfg, tok, s, seed=0)
    one = BatchConfig(micro_batch_size=1, global_batch_size=1)
    mb = collate([packed[0]], one, runtime)[0]
    first = mb["tokens"][0, :len(a) + len(b)].tolist()
    at = len(a) if first[:len(a)] == a else len(b)  # the seeded order decides which doc is first
    second = first[at:]
    assert second in (a, b) and mb["attention_mask"] is not None

    def losses(batch):
        with torch.no_grad():
            return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                         labels=batch["labels"])[0]

    alone = torch.tensor([second])
    ref = losses({"tokens": alone[:, :-1], "labels": alone[:, 1:],
                  "position_ids": torch.arange(len(second) - 1)[None]})
    got = losses(mb)[at:at + len(second) - 1]
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    causal = losses({k: v for k, v in mb.items() if k != "attention_mask"})[at:at + len(second) - 1]
    assert (causal - ref).abs().max() > 1e-3
    # the attention mask itself: block-diagonal and causal
    doc = torch.tensor([[0, 0, 1, 1, -1]])
    allowed = ~packed_attention_mask(doc)[0, 0]
    assert allowed.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                [0, 0, 0, 0, 1]]


def test_any_template_without_generation_tags(tok):
    """A template of another shape (no {% generation %}, a stop marker only after the last
    reply): the mask still covers the replies, and never text the full render lacks."""
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
                       "{% elif m['role'] == 'assistant' %}BOT: {{ m['content'] }}\n{% endif %}"
                       "{% if loop.last and m['role'] == 'assistant' %}[END]{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}BOT: {% endif %}")
    msgs = CONVS[0]
    ids, mask = tokenize_conversation(msgs, t)
    text = t.decode([i for i, m in zip(ids, mask) if m])
    assert text == " Four.\n Six, of course.\n[END]"  # " Four" is one token: the reply's
    with pytest.raises(UsageError, match="rejects a conversation"):
        t.chat_template = "{{ raise_exception('roles must alternate') }}"
        tokenize_conversation(msgs, t)
