"""``python -m post_training.ckpt to-gguf``: GGUF files that transformers' GGUF loader reads back.

The reference is always the source HF model loaded by transformers, never values the converter
itself computed: f16 must reproduce the source with its weights rounded to fp16 (same greedy
tokens, logits equal to float32 noise), q8_0 must stay within Q8_0's rounding bound per weight.
transformers' GGUF parsing is slow (~5 s per 49k-token vocabulary), so each file is converted
and loaded once per module.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import ROOT, clean_env
from post_training.checkpointing.tools import cli, to_gguf
from post_training.utils import UsageError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
# Leading blanks, digits, blank lines, a special token in the text, non-ASCII: where tokenizers differ.
STRINGS = ["Hello world!", "  two leading spaces and 12345 digits\n\nnew paragraph",
           "<|im_start|>user\nhi<|im_end|>", "émoji 🤖 über 北京"]


def convert(src: Path, out: Path, *flags: str) -> Path:
    assert cli.main(["to-gguf", str(src), str(out), *flags]) == 0
    return out


def load_gguf(path: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kw).eval()


def load_hf(path: Path, fp16_round: bool = False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if fp16_round:  # what an f16 GGUF can hold at best
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model


def prompt_ids(src: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)
    return torch.tensor([enc["input_ids"]])


def reader_fields(path: Path):
    import gguf

    r = gguf.GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def files(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    src = tiny_dirs["llama"]
    return {"f16": convert(src, out / "tiny.f16.gguf"), "q8_0": convert(src, out / "tiny.q8_0.gguf", "--type", "q8_0")}


@pytest.fixture(scope="module")
def readers(files):
    return {k: reader_fields(p) for k, p in files.items()}


def test_f16_round_trip_matches_source(tiny_dirs, files):
    src = tiny_dirs["llama"]
    ids = prompt_ids(src)
    ref, ref16, got = load_hf(src), load_hf(src, fp16_round=True), load_gguf(files["f16"])
    assert type(got).__name__ == "LlamaForCausalLM" and got.config.tie_word_embeddings
    with torch.no_grad():
        l_ref, l_ref16, l_got = ref(ids).logits, ref16(ids).logits, got(ids).logits
        # Same fp16 weights and the same float32 math: only summation-order noise may differ
        # (measured 0.0). Any Q/K permutation or name mix-up moves logits by O(1).
        assert (l_got - l_ref16).abs().max() < 1e-4
        # Against the float32 source, fp16 weight rounding costs ~4e-3 on logits of scale ~3.
        assert (l_got - l_ref).abs().max() < 2e-2
        g_ref = ref.generate(ids, max_new_tokens=16, do_sample=False)
        g_got = got.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(g_ref, g_got)


def test_q8_0_weights_within_format_bound_and_logits_close(tiny_dirs, files):
    src = tiny_dirs["llama"]
    ref, got = load_hf(src), load_gguf(files["q8_0"])
    sd_ref, sd_got = dict(ref.named_parameters()), got.state_dict()  # tied lm_head once
    checked = 0
    for name, w in sd_ref.items():
        if w.dim() != 2:
            assert torch.equal(sd_got[name], w), name  # 1-D tensors are stored F32: exact
            continue
        # Q8_0: blocks of 32 along a row share d = amax/127 (stored fp16); each weight is off by at
        # most d/2 from rounding plus 127 * |d - fp16(d)| <= 127 * d * 2^-11 from the scale.
        blocks = w.reshape(w.shape[0], -1, 32)
        bound = blocks.abs().amax(-1, keepdim=True) / 127 * (0.5 + 127 * 2**-11) + 1e-7
        err = (sd_got[name].reshape(blocks.shape) - blocks).abs()
        assert (err <= bound).all(), f"{name}: {(err / bound).max():.3f} x bound"
        assert err.max() > 0, name  # it really was quantized
        checked += 1
    assert checked == 1 + 7 * ref.config.num_hidden_layers  # embedding + q,k,v,o,gate,up,down
    ids = prompt_ids(src)
    with torch.no_grad():
        l_ref, l_got = ref(ids).logits, got(ids).logits
    # Per-weight relative noise ~0.5% (d/sqrt(12) of a ~2.5 sigma block max) adds up over the
    # layers to ~2% relative logit error here (measured 2.1e-2); 6% leaves room, a wrong tensor
    # layout gives ~100%.
    rel = (l_got - l_ref).norm() / l_ref.norm()
    assert rel < 6e-2, rel


def test_tensor_types_counts_and_header(tiny_dirs, readers):
    import gguf
    from safetensors import safe_open

    src = tiny_dirs["llama"]
    cfg = json.loads((src / "config.json").read_text())
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        src_shapes = {k: f.get_slice(k).get_shape() for k in f.keys() if k != "lm_head.weight"}
    Q = gguf.GGMLQuantizationType
    for kind, want_2d in (("f16", Q.F16), ("q8_0", Q.Q8_0)):
        r, kv = readers[kind]
        types = {t.name: t.tensor_type for t in r.tensors}
        assert len(types) == len(src_shapes)
        assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
        for t in r.tensors:
            assert t.tensor_type == (want_2d if len(t.shape) == 2 else Q.F32), (kind, t.name)
        assert sorted(int(t.n_elements) for t in r.tensors) == sorted(
            int(torch.tensor(s).prod()) for s in src_shapes.values())
        assert kv["general.architecture"] == "llama"
        assert kv["general.file_type"] == {"f16": 1, "q8_0": 7}[kind]
        assert kv["llama.block_count"] == cfg["num_hidden_layers"]
        assert kv["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
        assert kv["llama.rope.dimension_count"] == cfg["head_dim"]
        assert kv["llama.vocab_size"] == cfg["vocab_size"]


def test_tokenizer_metadata_and_round_trip(tiny_dirs, files, readers):
    from transformers import AutoTokenizer

    src = tiny_dirs["llama"]
    _, kv = readers["f16"]
    ref = AutoTokenizer.from_pretrained(src)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(kv["tokenizer.ggml.tokens"]) == len(kv["tokenizer.ggml.token_type"]) == len(ref)
    assert kv["tokenizer.chat_template"] == (src / "chat_template.jinja").read_text()
    assert kv["tokenizer.ggml.bos_token_id"] == ref.bos_token_id
    assert kv["tokenizer.ggml.eos_token_id"] == ref.eos_token_id
    assert kv["tokenizer.ggml.padding_token_id"] == ref.pad_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is False
    control = {i for i, t in enumerate(kv["tokenizer.ggml.token_type"]) if t == 3}
    assert control == set(ref.added_tokens_decoder)  # SmolLM2's added tokens are all special

    got = AutoTokenizer.from_pretrained(files["f16"].parent, gguf_file=files["f16"].name)
    for s in STRINGS:
        assert got(s)["input_ids"] == ref(s)["input_ids"], s
        assert got.decode(ref(s)["input_ids"]) == s
    text = got.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert got(text)["input_ids"] == ref(text)["input_ids"]
    assert got.eos_token == ref.eos_token and got.bos_token == ref.bos_token


def test_split_regex_pre_tokenizer_and_auto_bos(tiny_dirs, tmp_path):
    """A Llama-3/Qwen2-style split regex must be named so readers split the same way, and a
    post-processor that prepends BOS must become add_bos_token."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from post_training.checkpointing.tools.gguf_tokenizer import SPLIT_REGEX_NAMES

    try:  # our table must agree with transformers' reader, which maps the names back to regexes
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = None
    if GGUF_PRE_TOKENIZER_SPLITS is not None:
        for regex, name in SPLIT_REGEX_NAMES.items():
            assert GGUF_PRE_TOKENIZER_SPLITS[name] == regex, name

    src = tmp_path / "src"
    shutil.copytree(tiny_dirs["llama"], src)
    tj = json.loads((src / "tokenizer.json").read_text())
    regex = next(r for r, n in SPLIT_REGEX_NAMES.items() if n == "qwen2")
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    bos = "<|im_start|>"
    seq_a, seq_b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    tj["post_processor"] = {"type": "TemplateProcessing", "pair": [seq_a, seq_b],
                            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, seq_a],
                            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}}}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    out = convert(src, tmp_path / "m.gguf")
    ref = Tokenizer.from_file(str(src / "tokenizer.json"))
    got = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    gpt2_split = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    for s in STRINGS:
        assert got(s)["input_ids"] == ref.encode(s).ids, s
        assert ref.encode(s).ids[0] == 1
    # the test string really tells the regexes apart ("\n\n" is one chunk only with this one)
    assert ref.encode(STRINGS[1]).ids[1:] != gpt2_split(STRINGS[1])["input_ids"]


@pytest.mark.parametrize("kind", ["qwen2", pytest.param("qwen3", marks=pytest.mark.slow)])
def test_qwen_round_trip(kind, tiny_dirs, tmp_path):
    """Qwen2 (untied output, q/k/v biases) and Qwen3 (q/k norms): no rope permutation."""
    from transformers import AutoConfig

    src = tiny_dirs[kind]
    out = convert(src, tmp_path / f"{kind}.gguf")
    # transformers' GGUF config mapping ignores attention.key_length for qwen3 (it assumes the
    # default head_dim 128); llama.cpp reads it. So the qwen3 weights load into the source config.
    kw = {"config": AutoConfig.from_pretrained(src)} if kind == "qwen3" else {}
    got = load_gguf(out, **kw)
    assert type(got).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    assert got.config.tie_word_embeddings == (kind != "qwen2")
    ids = prompt_ids(tiny_dirs["llama"])
    with torch.no_grad():
        assert (got(ids).logits - load_hf(src, fp16_round=True)(ids).logits).abs().max() < 1e-4
    if kind == "qwen3":
        _, kv = reader_fields(out)
        assert kv["qwen3.attention.key_length"] == json.loads((src / "config.json").read_text())["head_dim"]


def test_dist_checkpoint_is_consolidated_first(tiny_dirs, tmp_path, monkeypatch):
    from post_training.io.layout import TRACKER
    from post_training.checkpointing.tools import consolidate

    ckpt = tmp_path / "run"
    ckpt.mkdir()
    (ckpt / TRACKER).write_text("release")
    monkeypatch.delattr(consolidate, "consolidate_to_hf", raising=False)
    with pytest.raises(UsageError, match="run consolidate first"):
        cli.main(["to-gguf", str(ckpt), str(tmp_path / "a.gguf")])

    calls = []

    def fake(ckpt_in: Path, out: Path, dtype: str) -> Path:
        calls.append((ckpt_in, out, dtype))
        return Path(shutil.copytree(tiny_dirs["llama"], out))

    monkeypatch.setattr(consolidate, "consolidate_to_hf", fake, raising=False)
    out = convert(ckpt, tmp_path / "out" / "b.gguf")
    assert calls and calls[0][0] == ckpt and calls[0][2] == "keep"
    assert not calls[0][1].exists()  # the temporary HF dir is gone
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.gguf"]
    assert out.read_bytes()[:4] == b"GGUF"


def _hidden_leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


def test_bad_inputs(tiny_dirs, tmp_path, monkeypatch):
    src = tiny_dirs["llama"]
    # unsupported architecture: named, before any weights are read
    other = tmp_path / "gpt2"
    other.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(UsageError, match="architecture GPT2LMHeadModel is not supported"):
        cli.main(["to-gguf", str(other), str(tmp_path / "x.gguf")])
    # not a checkpoint at all
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="neither a Hugging Face model directory"):
        cli.main(["to-gguf", str(empty), str(tmp_path / "x.gguf")])
    with pytest.raises(UsageError, match="no such checkpoint directory"):
        cli.main(["to-gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")])
    # a sentencepiece-style (byte_fallback) tokenizer cannot be written as gpt2 BPE
    spm = tmp_path / "spm"
    spm.mkdir()
    shutil.copy(src / "config.json", spm)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    (spm / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UsageError, match="byte_fallback"):
        cli.main(["to-gguf", str(spm), str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists() and not _hidden_leftovers(tmp_path)

    # an existing output is refused without --overwrite and left untouched
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "m.gguf"
    existing.write_text("keep me")
    with pytest.raises(UsageError, match="exists"):
        cli.main(["to-gguf", str(src), str(existing)])
    assert existing.read_text() == "keep me"

    # a failure half-way through the tensor data leaves neither OUT nor a temp file behind
    calls = {"n": 0}
    real_encode = to_gguf._encode

    def failing(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return real_encode(data, qtype)

    monkeypatch.setattr(to_gguf, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(["to-gguf", str(src), str(existing), "--overwrite"])
    assert existing.read_text() == "keep me" and not _hidden_leftovers(out_dir)
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(["to-gguf", str(src), str(out_dir / "new.gguf")])
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]


def test_cli_error_is_one_line_exit_2(tiny_dirs, tmp_path):
    existing = tmp_path / "m.gguf"
    existing.write_text("x")
    cmd = [sys.executable, "-m", "post_training.ckpt", "to-gguf", str(tiny_dirs["llama"]), str(existing)]
    res = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "--overwrite" in lines[0]
