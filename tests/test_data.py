"""Prompt files: json lists, jsonl chat messages, text; and the errors for bad ones."""
import json

import pytest

from post_training.data import DEFAULT_PROMPTS, load_prompts, render_prompt
from post_training.utils import UsageError


def test_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["hi", [{"role": "user", "content": "yo"}]]))
    assert load_prompts(str(tmp_path / "a.json")) == ["hi", [{"role": "user", "content": "yo"}]]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": msgs}) + "\n\n" + json.dumps({"messages": msgs[1:]}))
    assert load_prompts(str(tmp_path / "b.jsonl")) == [msgs, msgs[1:]]
    (tmp_path / "c.jsonl").write_text(json.dumps(msgs) + "\n")
    assert load_prompts(str(tmp_path / "c.jsonl")) == [msgs]
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert load_prompts(str(tmp_path / "d.txt")) == ["one", "two"]
    assert load_prompts(None) == DEFAULT_PROMPTS


@pytest.mark.parametrize("name,content,match", [
    ("x.json", "[1, 2", "not valid JSON"),
    ("x.json", "{}", "non-empty JSON list"),
    ("x.json", "[{\"role\": \"user\"}]", "chat messages"),
    ("x.jsonl", "{\"messages\": []}\nnot json", "line 2 is not valid JSON"),
    ("x.txt", "   \n", "is empty"),
])
def test_bad_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=match):
        load_prompts(str(tmp_path / name))


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_prompts(str(tmp_path / "nope.json"))


def test_render_uses_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = render_prompt("Hello", tok)
    text = tok.decode(ids)
    assert "<|im_start|>user\nHello<|im_end|>" in text and text.rstrip().endswith("<|im_start|>assistant")
    tok.chat_template = None
    with pytest.raises(UsageError, match="no chat template"):
        render_prompt("Hello", tok)
    assert tok.decode(render_prompt("Hello", tok, chat_template=False)).endswith("Hello")
