"""The low-level I/O layer: ``post_training.io`` and the offline checkpoint tools stay light
(no megatron-core, ModelOpt or transformers, nothing of the toolkit above utils), the atomic
output helper never leaves a partial target or debris, and the one shard writer writes what
transformers reads."""
from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch
from safetensors import safe_open

from dist_utils import PY, ROOT, clean_env
from post_training.io import atomic
from post_training.io.safetensors_io import INDEX, ShardWriter
from post_training.utils import UsageError

ALLOWED = ("post_training.io", "post_training.utils", "post_training.checkpointing.tools")


def test_io_and_tools_import_nothing_heavy_or_above_utils():
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import post_training.io, post_training.checkpointing.tools as tools
        mods = [m.name for pkg in (post_training.io, tools)
                for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + ".")
                if not m.name.endswith(".__main__")]  # __main__ runs the CLI
        for m in mods:
            importlib.import_module(m)
        print(json.dumps({"modules": mods, "loaded": sorted(sys.modules)}))
    """)
    res = subprocess.run([PY, "-c", code], env=clean_env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "post_training.io.atomic" in out["modules"] and "post_training.checkpointing.tools.cli" in out["modules"]
    heavy = [m for m in out["loaded"] if m.split(".")[0] in ("megatron", "modelopt", "transformers")]
    assert not heavy, heavy
    ours = [m for m in out["loaded"] if m.startswith("post_training.")]
    above = [m for m in ours if m != "post_training.checkpointing" and not m.startswith(ALLOWED)]
    assert not above, above


# ----------------------------------------------------------------------------- atomic outputs


def siblings(parent):
    return sorted(p.name for p in parent.iterdir())


def test_staged_dir_failure_leaves_target_and_no_debris(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.staged_dir(out, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["old.txt"]


def test_staged_dir_replaces_existing_target_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UsageError, match="not empty"):
        with atomic.staged_dir(out, overwrite=False):
            pass
    with atomic.staged_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert siblings(out) == ["old.txt"]  # untouched until the commit
    assert siblings(tmp_path) == ["out"] and siblings(out) == ["new.txt"]


def test_debris_of_killed_runs_is_removed(tmp_path):
    out = tmp_path / "out"
    for name in (".out.tmp-0123456789ab", ".out.tmp-deadbeef0000"):
        (tmp_path / name).mkdir()
    (tmp_path / ".other.tmp-0123456789ab").mkdir()  # another target's: not ours to remove
    with atomic.staged_dir(out, overwrite=False) as staging:
        (staging / "a").write_text("a")
    assert siblings(tmp_path) == [".other.tmp-0123456789ab", "out"]


def test_staged_file(tmp_path):
    out = tmp_path / "w.gguf"
    with pytest.raises(RuntimeError):
        with atomic.staged_file(out, overwrite=False) as tmp:
            tmp.write_text("partial")
            raise RuntimeError
    assert siblings(tmp_path) == []
    with atomic.staged_file(out, overwrite=False) as tmp:
        tmp.write_text("one")
    with pytest.raises(UsageError, match="exists"):
        with atomic.staged_file(out, overwrite=False):
            pass
    with atomic.staged_file(out, overwrite=True) as tmp:
        tmp.write_text("two")
        assert out.read_text() == "one"
    assert siblings(tmp_path) == ["w.gguf"] and out.read_text() == "two"


# ----------------------------------------------------------------------------- shard writer


def sample(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}
    sd["bias.bf16"] = torch.randn(16, generator=g).to(torch.bfloat16)
    sd["mask"] = torch.tensor([True, False, True])
    return sd


def read_dir(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    sd = sample()
    w = ShardWriter(tmp_path)
    for k, v in sd.items():
        w.add(k, v)
    assert w.finish() == ["model.safetensors"]
    assert siblings(tmp_path) == ["model.safetensors"]
    got = read_dir(tmp_path)
    assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())
    with safe_open(tmp_path / "model.safetensors", framework="pt") as st:
        assert st.metadata()["format"] == "pt"  # transformers refuses files without it


@pytest.mark.parametrize("mode", ["add", "stream"])
def test_several_shards_follow_transformers_layout(tmp_path, mode):
    sd = sample()
    w = ShardWriter(tmp_path, max_bytes=2 * 16 * 16 * 4)  # two weights per shard
    if mode == "add":
        for k, v in sd.items():
            w.add(k, v)
    else:
        w.stream([(k, tuple(v.shape), v.dtype) for k, v in sd.items()], iter(sd.items()))
    names = w.finish()
    assert names == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / INDEX).read_text())
    assert list(index["weight_map"]) == sorted(sd) and set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    for name in names:
        with safe_open(tmp_path / name, framework="pt") as st:
            assert set(st.keys()) == {k for k, f in index["weight_map"].items() if f == name}
    got = read_dir(tmp_path)
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in sd.items())


def test_stream_casts_floating_point_only(tmp_path):
    sd = {"w": torch.randn(4, 4), "ids": torch.arange(5)}
    w = ShardWriter(tmp_path)
    w.stream([(k, tuple(v.shape), v.dtype) for k, v in sd.items()], iter(sd.items()), cast=torch.bfloat16)
    w.finish()
    got = read_dir(tmp_path)
    assert torch.equal(got["w"], sd["w"].to(torch.bfloat16)) and torch.equal(got["ids"], sd["ids"])


def test_transformers_loads_a_sharded_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    w = ShardWriter(tmp_path, max_bytes=20_000)
    for k, v in ref.state_dict().items():
        w.add(k, v)
    assert len(w.finish()) > 2
    cfg.save_pretrained(tmp_path)
    got = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)
