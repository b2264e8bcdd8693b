"""``consolidate``: sharded checkpoints -> one HF directory that transformers loads with the
original weights. Sources are real: the toolkit's dist checkpoints and Megatron-LM legacy
``model_optim_rng.pt`` files written by megatron models at TP=2 and PP=2 over gloo ranks,
and (when deepspeed is installed) a ZeRO checkpoint of a 2-step CPU training run."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dist_utils import PY, ROOT, clean_env, torchrun
from post_training.checkpointing.tools import cli, consolidate_mcore
from post_training.checkpointing.tools.consolidate import consolidate_to_hf, parse_size
from post_training.cli import run_entry
from post_training.utils import UsageError

pytestmark = pytest.mark.slow
MODELS = ("llama", "qwen3", "qwen2")
IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000  # the workers' input


@pytest.fixture(scope="module")
def srcs(tiny_dirs, tmp_path_factory) -> Path:
    """BASE/<model>/{dist,legacy,logits.pt}; llama also at PP=2; qwen3 also FP8-quantized."""
    base = tmp_path_factory.mktemp("consolidate_src")
    torchrun(2, "consolidate_src.py", *[a for k in MODELS for a in ("--model", f"{k}={tiny_dirs[k]}")],
             "--out", str(base), "--pp-model", "llama", "--quantize-model", "qwen3")
    return base


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def hf_logits(d: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def assert_same_weights(got_dir: Path, want_dir: Path) -> None:
    got, want = tensors(got_dir), tensors(want_dir)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def cli_run(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        run_entry(cli.main, ["consolidate", *argv])
    return e.value.code


def no_staging_left(out: Path) -> bool:
    return not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


@pytest.mark.parametrize("model", MODELS)
def test_dist_tp2_loads_in_transformers_with_the_toolkit_logits(srcs, tiny_dirs, tmp_path, model):
    """llama (tied), qwen3 (q/k norm), qwen2 (QKV biases, untied head) saved at TP=2."""
    out = consolidate_to_hf(srcs / model / "dist", tmp_path / "hf")
    assert_same_weights(out, tiny_dirs[model])  # bit-exact: fp32 all the way
    got = hf_logits(out)
    toolkit = torch.load(srcs / model / "logits.pt")["logits"]
    assert (got - toolkit).abs().max().item() < 1e-4
    assert (got - hf_logits(tiny_dirs[model])).abs().max().item() < 1e-4
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "float32" and cfg["architectures"] == json.loads(
        (tiny_dirs[model] / "config.json").read_text())["architectures"]


@pytest.mark.parametrize("model", MODELS)
def test_legacy_tp2_merge_equals_the_original(srcs, tiny_dirs, tmp_path, model):
    """TP slices merged per megatron's conventions (qkv and fc1 per-rank [gate_r; up_r] on
    dim 0, linear_proj / fc2 on dim 1, vocab rows); args is an argparse.Namespace."""
    out = consolidate_to_hf(srcs / model / "legacy", tmp_path / "hf", hf_config=tiny_dirs[model])
    assert_same_weights(out, tiny_dirs[model])
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("src", ["dist_pp2", "legacy_pp2"])
def test_pp2_checkpoints(srcs, tiny_dirs, tmp_path, src):
    """PP=2: the dist checkpoint stores global layer indices; legacy stages number their layers
    from 0 and the last stage holds a copy of the tied embedding as output_layer."""
    out = consolidate_to_hf(srcs / "llama" / src, tmp_path / "hf", hf_config=tiny_dirs["llama"])
    assert_same_weights(out, tiny_dirs["llama"])


def test_legacy_config_from_args_without_hf_config(srcs, tiny_dirs, tmp_path, capsys):
    out = consolidate_to_hf(srcs / "qwen2" / "legacy", tmp_path / "hf")
    assert "built one from the checkpoint's args" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and not cfg["tie_word_embeddings"]
    assert not (out / "tokenizer.json").exists()
    assert_same_weights(out, tiny_dirs["qwen2"])
    assert (hf_logits(out) - torch.load(srcs / "qwen2" / "logits.pt")["logits"]).abs().max() < 1e-4


def test_other_pickle_globals_in_legacy_args_need_trust_pickle(srcs, tiny_dirs, tmp_path, capsys):
    ckpt = tmp_path / "legacy"
    shutil.copytree(srcs / "llama" / "legacy", ckpt)
    f = ckpt / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(f, weights_only=False)
    state["args"].save = Path("/somewhere")  # a global that weights_only does not allow
    torch.save(state, f)
    assert cli_run(str(ckpt), str(tmp_path / "out"), "--hf-config", str(tiny_dirs["llama"])) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "pathlib" in err[0] and "--trust-pickle" in err[0], err
    assert not (tmp_path / "out").exists()
    assert cli_run(str(ckpt), str(tmp_path / "out"), "--hf-config", str(tiny_dirs["llama"]), "--trust-pickle") == 0
    assert_same_weights(tmp_path / "out", tiny_dirs["llama"])


def test_index_covers_every_shard_and_max_shard_size_splits(srcs, tiny_dirs, tmp_path):
    out = consolidate_to_hf(srcs / "qwen2" / "dist", tmp_path / "hf", max_shard_size="100kB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 6 and sorted(set(index["weight_map"].values())) == shards
    total = 0
    for name in shards:
        with safe_open(out / name, framework="pt") as st:
            keys = set(st.keys())
            sizes = [st.get_slice(k).get_shape() for k in keys]
        assert keys == {k for k, v in index["weight_map"].items() if v == name}
        nbytes = sum(4 * int(torch.Size(s).numel()) for s in sizes)
        assert nbytes <= 100_000 or len(keys) == 1  # a larger tensor gets a shard of its own
        total += nbytes
    assert index["metadata"]["total_size"] == total
    assert_same_weights(out, tiny_dirs["qwen2"])


def test_dtype_cast(srcs, tiny_dirs, tmp_path):
    out = consolidate_to_hf(srcs / "qwen3" / "dist", tmp_path / "hf", "bf16")
    want = tensors(tiny_dirs["qwen3"])
    got = tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in want.items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_quantized_checkpoint_is_refused_on_the_command_line(srcs, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([PY, "-m", "post_training.ckpt", "consolidate", str(srcs / "qwen3" / "fp8"), str(out)],
                         env=clean_env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error:") and "quantized" in lines[0] and "scripts/export.sh" in lines[0]
    assert not out.exists() and no_staging_left(out)


@pytest.mark.parametrize("toolkit_meta", [True, False], ids=["toolkit", "megatron-lm"])
def test_missing_or_truncated_shard_is_a_clear_error(srcs, tmp_path, toolkit_meta):
    """With toolkit_meta.json its recorded sizes catch it; without (a Megatron-LM checkpoint),
    the byte ranges named in the DCP metadata do."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(srcs / "llama" / "dist", ckpt)
    it = ckpt / "iter_0000010"
    if not toolkit_meta:
        (it / "toolkit_meta.json").unlink()
    shards = sorted(it.glob("*.distcp"))
    with open(shards[1], "r+b") as f:
        f.truncate(shards[1].stat().st_size // 2)
    with pytest.raises(UsageError, match=f"{shards[1].name}.*truncated"):
        consolidate_to_hf(ckpt, tmp_path / "out")
    shards[1].unlink()
    with pytest.raises(UsageError, match=f"incomplete.*{shards[1].name}.*missing"):
        consolidate_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_staging_left(tmp_path / "out")


def test_output_is_refused_when_not_empty_and_never_left_partial(srcs, tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty.*--overwrite"):
        consolidate_to_hf(srcs / "llama" / "dist", out)
    assert (out / "keep.txt").read_text() == "mine"

    real = consolidate_mcore.stream

    def failing(units, read):  # dies after the first tensor is written
        gen = real(units, read)
        yield next(gen)
        raise RuntimeError("disk full")

    monkeypatch.setattr(consolidate_mcore, "stream", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        consolidate_to_hf(srcs / "llama" / "dist", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and no_staging_left(out)
    monkeypatch.setattr(consolidate_mcore, "stream", real)
    consolidate_to_hf(srcs / "llama" / "dist", out, overwrite=True)
    assert not (out / "keep.txt").exists() and no_staging_left(out)
    assert_same_weights(out, tiny_dirs["llama"])


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="not found"):
        consolidate_to_hf(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(UsageError, match="not a checkpoint consolidate knows"):
        consolidate_to_hf(tmp_path, tmp_path / "out")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20 and parse_size("100") == 100
    with pytest.raises(UsageError, match="max-shard-size"):
        parse_size("lots")
    zero = tmp_path / "zero"
    (zero / "global_step1").mkdir(parents=True)
    (zero / "latest").write_text("global_step1")
    (zero / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    for name in [m for m in sys.modules if m.split(".")[0] == "deepspeed"] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)  # as on a machine without deepspeed
    with pytest.raises(UsageError, match="DeepSpeed ZeRO checkpoint.*needs deepspeed"):
        consolidate_to_hf(zero, tmp_path / "out")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_checkpoint(tiny_dirs, tmp_path, stage):
    save, ref = tmp_path / "ds", tmp_path / "ref.pt"
    env = clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", env["MASTER_PORT"],
           str(ROOT / "tests" / "workers" / "deepspeed_zero.py"), "--hf-dir", str(tiny_dirs["llama"]),
           "--stage", str(stage), "--save", str(save), "--out", str(ref)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    with pytest.raises(UsageError, match="full pickle.*--trust-pickle"):  # DeepSpeed's reader unpickles
        consolidate_to_hf(save, tmp_path / "out")
    out = consolidate_to_hf(save, tmp_path / "out", trust_pickle=True)
    assert (hf_logits(out) - torch.load(ref)["logits"]).abs().max().item() < 1e-4
    assert (out / "tokenizer.json").is_file()
    # inspect reads the same real checkpoint without unpickling it: stage and DP size from
    # DeepSpeed's own files, weights vs optimizer state told apart
    from post_training.checkpointing.tools.inspect_cmd import inspect_path

    rep = inspect_path(save)
    assert rep["kind"].startswith("deepspeed"), rep["kind"]
    assert rep["layout"].get("zero_stage") == stage and rep["layout"].get("dp") == 2, rep["layout"]
    roles = {f["path"].rsplit("/", 1)[-1]: f["role"] for f in rep["files"]}
    optim = [n for n in roles if n.endswith("optim_states.pt")]
    # under ZeRO-3 the module files hold placeholders: the weights live in the optimizer partitions
    want = "optimizer state+weights" if stage == 3 else "optimizer state"
    assert len(optim) == 2 and all(roles[n] == want for n in optim), str(roles)
