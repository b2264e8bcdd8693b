"""``python -m post_training.ckpt to-safetensors``: real torch files in, checked with independent
readers (transformers, safetensors.safe_open, ``sha256sum -c``)."""
import argparse
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT
from post_training.checkpointing.tools.cli import main
from post_training.utils import UsageError


def convert(*args):
    return main(["to-safetensors", *map(str, args)])


def read_all(d):
    """Every tensor of a safetensors file or directory, and the metadata of each file."""
    files = [d] if d.is_file() else sorted(d.glob("*.safetensors"))
    tensors, meta = {}, {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            meta[f.name] = h.metadata()
            for k in h.keys():
                assert k not in tensors
                tensors[k] = h.get_tensor(k)
    return tensors, meta


def assert_sums_ok(d):
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=d, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    listed = {line.split("  ", 1)[1] for line in (d / "SHA256SUMS").read_text().splitlines()}
    assert listed == {p.name for p in d.iterdir()} - {"SHA256SUMS"}


def no_staging_left(parent):
    return not [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".tmp")]


def logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def llama_sd(tiny_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).state_dict()


@pytest.fixture(scope="module")
def bin_dirs(tiny_dirs, llama_sd, tmp_path_factory):
    """The tiny llama as pytorch_model.bin (tied lm_head included, sharing storage, as torch.save of
    a tied model's state_dict writes it) and as two .bin shards + index without lm_head (as older
    save_pretrained sharded it). transformers 5 no longer writes .bin files."""
    root = tmp_path_factory.mktemp("bins")
    single, sharded = root / "single", root / "sharded"
    for d in (single, sharded):
        shutil.copytree(tiny_dirs["llama"], d)
        (d / "model.safetensors").unlink()
    assert llama_sd["lm_head.weight"].data_ptr() == llama_sd["model.embed_tokens.weight"].data_ptr()
    torch.save(llama_sd, single / "pytorch_model.bin")
    keys = [k for k in llama_sd if k != "lm_head.weight"]
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: llama_sd[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {"single": single, "sharded": sharded}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_dir_converts_and_loads_identically(layout, bin_dirs, tiny_dirs, llama_sd, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--max-shard-size", "200KB"] if layout == "sharded" else []
    assert convert(bin_dirs[layout], out, *args) == 0
    if layout == "single":  # reported as dropped: it shares storage with the embedding
        assert "dropped tied (config ties it to the input embedding): lm_head.weight" in capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    for f in ("config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json", "SHA256SUMS"):
        assert f in files
    assert not [f for f in files if f.endswith(".bin") or f.endswith(".bin.index.json")]
    if layout == "sharded":  # a 12.6 MB embedding + 0.6 MB of layers in 200 KB shards
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3
        assert set(index["weight_map"]) == set(llama_sd) - {"lm_head.weight"}
    else:
        assert "model.safetensors" in files
    tensors, meta = read_all(out)
    assert set(tensors) == set(llama_sd) - {"lm_head.weight"}  # dropped: the config ties it
    for k, t in tensors.items():
        assert torch.equal(t, llama_sd[k]), k
    assert all(m.get("format") == "pt" for m in meta.values())
    assert_sums_ok(out)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(out, ids), logits(tiny_dirs["llama"], ids))
    assert no_staging_left(tmp_path)


def test_dtype_cast_updates_config(bin_dirs, llama_sd, tmp_path):
    out = tmp_path / "bf16"
    assert convert(bin_dirs["single"], out, "--dtype", "bf16") == 0
    tensors, _ = read_all(out)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert torch.equal(tensors["model.norm.weight"], llama_sd["model.norm.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_sums_ok(out)


def test_wrapped_dict_with_shared_tensors(tmp_path, capsys):
    """A training checkpoint: nested module dicts, a tied tensor, a view of a packed buffer, and
    non-tensor entries beside the weights."""
    emb = torch.randn(10, 4)
    packed = torch.randn(6, 4)
    sd = {"encoder": {"embed": emb, "layers": [{"w": torch.randn(4, 4), "qk": packed[:4]}]},
          "decoder.head": emb, "v": packed[4:], "steps": torch.tensor(7)}
    ckpt = {"model": sd, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}}, "epoch": 3}
    src = tmp_path / "train.pt"
    torch.save(ckpt, src)
    out = tmp_path / "out"
    assert convert(src, out) == 0
    printed = capsys.readouterr().out
    assert "optimizer (dict)" in printed and "epoch (int)" in printed
    tensors, meta = read_all(out)
    want = {"encoder.embed": emb, "encoder.layers.0.w": sd["encoder"]["layers"][0]["w"],
            "encoder.layers.0.qk": packed[:4], "decoder.head": emb, "v": packed[4:], "steps": torch.tensor(7)}
    assert set(tensors) == set(want)
    for k, t in want.items():
        assert torch.equal(tensors[k], t), k
    assert json.loads(meta["model.safetensors"]["shared"]) == {"decoder.head": "encoder.embed"}
    assert_sums_ok(out)


def test_single_file_output_and_legacy_format(tmp_path):
    """A legacy (pre-zip) torch file, written to a .safetensors path with a .sha256 beside it."""
    sd = {"a": torch.randn(3, 5), "b": torch.arange(6, dtype=torch.int64), "c": torch.randn(2).half()}
    src = tmp_path / "legacy.bin"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    out = tmp_path / "w.safetensors"
    assert convert(src, out) == 0
    tensors, _ = read_all(out)
    assert set(tensors) == set(sd) and all(torch.equal(tensors[k], sd[k]) for k in sd)
    res = subprocess.run(["sha256sum", "-c", "w.safetensors.sha256"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    with pytest.raises(UsageError, match="exists"):
        convert(src, out)
    assert no_staging_left(tmp_path)


def test_pickle_globals_refused_unless_trusted(tmp_path):
    src = tmp_path / "megatron_style.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {"w": torch.ones(2, 2)}}, src)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"argparse\.Namespace.*--trust-pickle"):
        convert(src, out)
    assert not out.exists() and no_staging_left(tmp_path)
    assert convert(src, out, "--trust-pickle") == 0
    assert torch.equal(read_all(out)[0]["w"], torch.ones(2, 2))


def test_bad_inputs(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    with pytest.raises(UsageError, match="no such file"):
        convert(tmp_path / "missing.pt", tmp_path / "o1")
    (tmp_path / "notes.pt").write_text("not a torch file\n")
    with pytest.raises(UsageError, match="not a readable torch file"):
        convert(tmp_path / "notes.pt", tmp_path / "o2")
    empty_dir = tmp_path / "hf"
    empty_dir.mkdir()
    (empty_dir / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="no pytorch_model.bin"):
        convert(empty_dir, tmp_path / "o3")
    with pytest.raises(UsageError, match="positive size"):
        convert(good, tmp_path / "o4", "--max-shard-size", "lots")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        convert(good, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]
    assert no_staging_left(tmp_path)
    assert convert(good, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "model.safetensors"]


def test_cli_error_is_one_line_exit_2(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"\x00garbage")
    res = subprocess.run([sys.executable, "-m", "post_training.ckpt", "to-safetensors", str(tmp_path / "x.pt"),
                          str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "not a readable torch file" in lines[0]
    assert no_staging_left(tmp_path) and not (tmp_path / "out").exists()
