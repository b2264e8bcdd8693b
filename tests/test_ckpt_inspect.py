"""``python -m post_training.ckpt inspect``: every layout made by the real library that writes it."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import ROOT, clean_env
from post_training.checkpointing.tools import cli
from post_training.checkpointing.tools.inspect_cmd import inspect_path, render
from post_training.utils import UsageError


def by_path(rep: dict) -> dict[str, dict]:
    return {e["path"]: e for e in rep["files"]}


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="module")
def numel(tiny_llama) -> int:
    """Parameters of the real model (tied embedding counted once), from transformers itself."""
    return hf_model(tiny_llama).num_parameters()


def mcore_state(tiny_llama: Path) -> dict[str, torch.Tensor]:
    """The tiny Llama under megatron-core names (fused QKV and gate/up), unsharded."""
    from safetensors.torch import load_file

    sd = load_file(tiny_llama / "model.safetensors")
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    for i in range(4):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "self_attention.linear_qkv.weight"] = torch.cat(
            [sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[m + "self_attention.linear_qkv.layer_norm_weight"] = sd[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[h + f"mlp.{x}_proj.weight"] for x in ("gate", "up")])
        out[m + "mlp.linear_fc1.layer_norm_weight"] = sd[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc2.weight"] = sd[h + "mlp.down_proj.weight"]
    return out


def tp_slice(name: str, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Megatron's split: column-parallel along dim 0, row-parallel along dim 1, norms replicated."""
    if name.endswith(("word_embeddings.weight", "linear_qkv.weight", "linear_fc1.weight")):
        return t.chunk(tp, 0)[rank].clone()
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(tp, 1)[rank].clone()
    return t.clone()


# ----------------------------------------------------------------------------- Hugging Face
def test_hf_model_dir(tiny_llama, numel):
    rep = inspect_path(tiny_llama)
    assert rep["kind"] == "hf-model" and rep["architecture"].startswith("LlamaForCausalLM")
    assert rep["parameters"] == numel and rep["dtypes"] == {"float32": numel}
    files = by_path(rep)
    w = files["model.safetensors"]
    assert (w["role"], w["inference"], w["resume"], w["editable"]) == ("weights", True, True, False)
    assert w["pickle"] == "none"
    gen = files["generation_config.json"]
    assert gen["role"] == "generation behaviour" and gen["editable"] and not gen["resume"]
    assert files["chat_template.jinja"]["role"] == "chat template" and files["chat_template.jinja"]["editable"]
    assert files["config.json"]["inference"] and not files["config.json"]["editable"]
    assert files["tokenizer.json"]["role"] == "tokenizer" and not files["tokenizer.json"]["resume"]
    assert rep["total_bytes"] == sum(p.stat().st_size for p in tiny_llama.iterdir())
    assert rep["missing"]["deploy"] == [] and any("optimizer" in m for m in rep["missing"]["resume"])
    table = render(rep)
    row = next(line for line in table.splitlines() if line.startswith("model.safetensors "))
    assert row.split()[1:5] == ["weights", "yes", "yes", "no"]


def test_sharded_hf_dir_and_missing_shard(tiny_llama, numel, tmp_path):
    out = tmp_path / "sharded"
    hf_model(tiny_llama).save_pretrained(out, max_shard_size="200KB")
    shards = sorted(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    rep = inspect_path(out)
    assert rep["parameters"] == numel and rep["layout"]["weight_files"] == len(shards)
    idx = by_path(rep)["model.safetensors.index.json"]
    assert idx["role"] == "weights index" and idx["inference"] and not idx["editable"]
    assert any("tokenizer" in m for m in rep["missing"]["deploy"])  # save_pretrained wrote none
    (out / shards[-1]).unlink()
    rep = inspect_path(out)
    assert any(shards[-1] in p for p in rep["problems"])
    assert any(shards[-1] in m for m in rep["missing"]["deploy"])


def test_torch_bin_tied_weights_and_legacy_pickle(tiny_llama, numel, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    model = hf_model(tiny_llama)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    rep = inspect_path(d)
    assert rep["kind"] == "hf-model" and rep["parameters"] == numel  # the shared storage counted once
    assert by_path(rep)["pytorch_model.bin"]["pickle"] == "weights_only"
    old = tmp_path / "old.bin"
    torch.save(model.state_dict(), old, _use_new_zipfile_serialization=False)
    rep = inspect_path(old)
    assert rep["kind"] == "torch-file" and rep["parameters"] is None
    assert rep["files"][0]["pickle"] == "legacy_unchecked"
    assert "pickle (legacy format, cannot check)" in render(rep)


def test_single_safetensors_file(tiny_llama, numel):
    rep = inspect_path(tiny_llama / "model.safetensors")
    assert rep["kind"] == "safetensors-file" and rep["parameters"] == numel
    assert any("config.json" in m for m in rep["missing"]["deploy"])


def test_peft_adapter(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(hf_model(tiny_llama), lora)
    trainable, _ = model.get_nb_trainable_parameters()
    model.save_pretrained(tmp_path / "lora")
    rep = inspect_path(tmp_path / "lora")
    assert rep["kind"] == "peft-adapter" and rep["parameters"] == trainable
    assert rep["adapter"]["r"] == 4 and sorted(rep["adapter"]["target_modules"]) == ["q_proj", "v_proj"]
    files = by_path(rep)
    assert files["adapter_model.safetensors"]["role"] == "adapter weights"
    assert files["adapter_config.json"]["inference"] and not files["adapter_config.json"]["editable"]
    assert any(str(tiny_llama) in m and "merge-lora" in m for m in rep["missing"]["deploy"])


def test_hf_trainer_output(tiny_llama, numel, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 1000, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2,
                             per_device_train_batch_size=4, use_cpu=True, report_to=[], disable_tqdm=True)
    Trainer(model=hf_model(tiny_llama), args=args,
            train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})).train()
    rep = inspect_path(tmp_path / "out")
    assert rep["kind"] == "hf-trainer" and rep["layout"]["iteration"] == 2
    assert rep["parameters"] == numel
    files = by_path(rep)
    opt = files["checkpoint-2/optimizer.pt"]
    assert (opt["role"], opt["inference"], opt["resume"]) == ("optimizer state", False, True)
    assert opt["pickle"] == "weights_only"
    assert files["checkpoint-2/scheduler.pt"]["role"] == "scheduler"
    assert files["checkpoint-2/rng_state.pth"]["role"] == "RNG"
    args_file = files["checkpoint-2/training_args.bin"]
    assert args_file["pickle"] == "needs_globals"
    assert "transformers.training_args.TrainingArguments" in args_file["pickle_globals"]
    assert files["checkpoint-2/trainer_state.json"]["resume"]
    assert rep["missing"]["resume"] == []
    assert any(m.startswith("tokenizer") for m in rep["missing"]["deploy"])  # no processing_class given
    (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").unlink()
    assert any("optimizer" in m for m in inspect_path(tmp_path / "out")["missing"]["resume"])


# ----------------------------------------------------------------------------- GGUF
def write_gguf(path: Path, tokenizer: bool) -> dict[str, int]:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_chat_template("{{ messages }}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.random((32, 16), dtype=np.float32).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", rng.random(16, dtype=np.float32))
    q = gguf.quants.quantize(rng.random((8, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"F16": 32 * 16, "F32": 16, "Q8_0": 8 * 64}


def test_gguf(tmp_path):
    expected = write_gguf(tmp_path / "m.gguf", tokenizer=True)
    rep = inspect_path(tmp_path / "m.gguf")
    assert rep["kind"] == "gguf" and rep["architecture"] == "llama (tiny)"
    assert rep["dtypes"] == expected and rep["parameters"] == sum(expected.values())
    f = rep["files"][0]
    assert "tokenizer" in f["role"] and f["inference"] and not f["resume"] and f["pickle"] == "none"
    assert rep["missing"]["deploy"] == []
    write_gguf(tmp_path / "bare.gguf", tokenizer=False)
    assert any("tokenizer" in m for m in inspect_path(tmp_path / "bare.gguf")["missing"]["deploy"])
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:200])
    with pytest.raises(UsageError, match="cut.gguf: not a readable GGUF"):
        inspect_path(tmp_path / "cut.gguf")


# ----------------------------------------------------------------------------- Megatron
@pytest.fixture(scope="module")
def dist_root(tiny_llama, runtime, tmp_path_factory) -> Path:
    """A real save by the toolkit (TP=1, in process: a TP=2 torchrun costs ~30 s here)."""
    from post_training.checkpointing import save_checkpoint
    from post_training.config import SourceConfig
    from post_training.model_builder import setup_model
    from post_training.config import ModelConfig

    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    root = tmp_path_factory.mktemp("dist") / "run"
    save_checkpoint(model, runtime, root, 4, hf_dir=tiny_llama)
    return root


def test_toolkit_dist_checkpoint(dist_root, numel, tmp_path):
    rep = inspect_path(dist_root)
    assert rep["kind"] == "toolkit-dist" and rep["architecture"].startswith("LlamaForCausalLM")
    assert rep["parameters"] == numel  # global shapes from the DCP metadata, nothing loaded
    lay = rep["layout"]
    assert (lay["tp"], lay["pp"], lay["ranks"], lay["iteration"], lay["format"]) == (1, 1, 1, 4, "torch_dist")
    files = by_path(rep)
    tracker = files["latest_checkpointed_iteration.txt"]
    assert tracker["role"] == "pointer" and not tracker["editable"]
    shards = [e for p, e in files.items() if p.endswith(".distcp")]
    assert shards and all(e["role"] == "weights" and e["pickle"] != "needs_globals" for e in shards)
    assert files["iter_0000004/.metadata"]["pickle_globals"]  # a plain pickle, checked by name
    assert files["hf_config/config.json"]["role"] == "config"
    assert {"optimizer state", "scheduler state", "RNG state"} <= set(rep["missing"]["resume"])
    assert any("consolidate" in m for m in rep["missing"]["deploy"]) and rep["problems"] == []

    # Without our toolkit_meta.json it is a plain Megatron-LM checkpoint: TP from the DCP chunks
    # (the SwiGLU fc1 is stored as two chunks even at TP=1; that must not read as TP=2).
    plain = tmp_path / "plain"
    shutil.copytree(dist_root, plain)
    (plain / "iter_0000004" / "toolkit_meta.json").unlink()
    (plain / "iter_0000004" / "__0_0.distcp").unlink()
    rep = inspect_path(plain)
    assert rep["kind"] == "megatron-dist" and rep["layout"]["tp"] == 1
    assert any("__0_0.distcp" in p for p in rep["problems"])


@pytest.mark.parametrize("modes", [["quantize"], ["auto_quantize"]])
def test_quantized_dist_checkpoint_deploys_through_export(dist_root, tmp_path, modes):
    # consolidate refuses a ModelOpt-quantized checkpoint (plain weights would drop the
    # quantization), so the deploy advice is ModelOpt's unified HF export instead.
    quant = tmp_path / "quant"
    shutil.copytree(dist_root, quant)
    meta_file = quant / "iter_0000004" / "toolkit_meta.json"
    meta = json.loads(meta_file.read_text())
    assert not meta.get("modelopt_modes")
    meta["modelopt_modes"] = modes
    meta_file.write_text(json.dumps(meta))
    export = f"MLM_MODEL_CKPT={quant} EXPORT_DIR=<out> bash scripts/export.sh"
    for target in (quant, quant / "iter_0000004"):  # given the root or the iteration dir
        rep = inspect_path(target)
        assert rep["kind"] == "toolkit-dist" and rep["problems"] == []
        assert f"ModelOpt modes: {modes[0]}" in rep["notes"]
        deploy = rep["missing"]["deploy"]
        assert any(export in m for m in deploy), deploy
        assert not any("post_training.ckpt consolidate" in m for m in deploy), deploy
        assert export in render(rep) and "post_training.ckpt consolidate" not in render(rep)


def test_dcp_metadata_never_unpickled(dist_root, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(dist_root, evil)
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (evil / "iter_0000004" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UsageError, match=r"\.metadata: DCP metadata asks for pickle global pathlib"):
        inspect_path(evil)
    assert not marker.exists()


def test_megatron_legacy_tp2(tiny_llama, numel, tmp_path):
    full = mcore_state(tiny_llama)
    args = argparse.Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, num_layers=4,
                              hidden_size=64, num_attention_heads=4)
    it = tmp_path / "iter_0000005"
    for r in range(2):
        (it / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save({"model": {k: tp_slice(k, v, r, 2) for k, v in full.items()}, "args": args,
                    "checkpoint_version": 3.0, "iteration": 5}, it / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    rep = inspect_path(tmp_path)
    assert rep["kind"] == "megatron-legacy"
    assert (rep["layout"]["tp"], rep["layout"]["pp"], rep["layout"]["iteration"]) == (2, 1, 5)
    assert rep["parameters"] == numel  # TP slices summed, replicated norms once
    rank0 = by_path(rep)["iter_0000005/mp_rank_00/model_optim_rng.pt"]
    assert rank0["pickle"] == "needs_globals" and rank0["pickle_globals"] == ["argparse.Namespace"]
    assert rank0["role"] == "weights" and "RUNS CODE: argparse.Namespace" in render(rep)
    assert {"optimizer state", "RNG state"} <= set(rep["missing"]["resume"])
    assert rep["architecture"].startswith("Megatron GPT (4 layers")


# ----------------------------------------------------------------------------- DeepSpeed
class LossScaler:  # stands in for deepspeed.runtime.fp16.loss_scaler.LossScaler
    def __init__(self) -> None:
        self.cur_scale = 1.0


def deepspeed_dir(root: Path, tiny_llama: Path, stage: int, dp: int, plain_optim: bool) -> Path:
    """The files DeepSpeed's engine writes for one tag, with dicts shaped like its own."""
    from safetensors.torch import load_file

    sd = load_file(tiny_llama / "model.safetensors")
    tag = root / "global_step2"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step2")
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's consolidation script (copied into each checkpoint)\n")
    cfg = {"bf16": {"enabled": True}}
    if plain_optim:
        cfg["zero_optimization"] = {"stage": stage}
    states = {"module": {k: v.to(torch.bfloat16) for k, v in sd.items()} if stage < 3 else None,
              "buffer_names": [], "param_shapes": [OrderedDict((k, v.shape) for k, v in sd.items())],
              "lr_scheduler": {"last_epoch": 2}, "global_steps": 2, "ds_config": cfg, "ds_version": "0.16.4"}
    names = ["mp_rank_00_model_states.pt"] if stage < 3 else [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"
                                                                for r in range(dp)]
    for n in names:
        torch.save(states, tag / n)
    n_params = sum(v.numel() for v in sd.values())
    for r in range(dp):
        osd = {"zero_stage": stage, "partition_count": [dp], "loss_scaler": None if plain_optim else LossScaler(),
               "single_partition_of_fp32_groups": [torch.zeros(n_params // dp)]}
        torch.save({"optimizer_state_dict": osd, "ds_config": cfg, "ds_version": "0.16.4"},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return root


def test_deepspeed_zero2(tiny_llama, numel, tmp_path):
    root = deepspeed_dir(tmp_path / "ds", tiny_llama, stage=2, dp=2, plain_optim=True)
    rep = inspect_path(root)
    assert rep["kind"] == "deepspeed"
    assert (rep["layout"]["zero_stage"], rep["layout"]["dp"], rep["layout"]["tp"]) == (2, 2, 1)
    assert rep["parameters"] == numel and rep["dtypes"] == {"bfloat16": numel}
    files = by_path(rep)
    assert files["latest"]["role"] == "pointer"
    assert files["zero_to_fp32.py"]["role"] == "tool script" and not files["zero_to_fp32.py"]["inference"]
    model = files["global_step2/mp_rank_00_model_states.pt"]
    assert model["role"] == "weights+scheduler" and model["inference"] and model["pickle"] == "weights_only"
    opt = files["global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert opt["role"] == "optimizer state" and opt["resume"] and not opt["inference"]
    assert rep["missing"]["resume"] == [] and any("zero_to_fp32" in m for m in rep["missing"]["deploy"])
    (root / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    rep = inspect_path(root)
    assert any("dp rank 1" in p for p in rep["problems"]) and rep["missing"]["resume"]


def test_deepspeed_zero3_from_names(tiny_llama, numel, tmp_path):
    # The optimizer files need a class to unpickle (as DeepSpeed's real LossScaler does), and the
    # config does not say the stage: stage 3 comes from the per-rank model-states file names.
    root = deepspeed_dir(tmp_path / "ds", tiny_llama, stage=3, dp=2, plain_optim=False)
    rep = inspect_path(root)
    assert rep["layout"]["zero_stage"] == 3 and rep["layout"]["dp"] == 2
    assert rep["parameters"] == numel
    opt = by_path(rep)["global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert opt["pickle"] == "needs_globals" and any(g.endswith("LossScaler") for g in opt["pickle_globals"])
    assert opt["role"] == "optimizer state+weights" and opt["inference"]  # ZeRO-3 weights live there


# ----------------------------------------------------------------------------- CLI
def test_json_output_is_one_stable_document(tiny_llama, capsys):
    assert cli.main(["inspect", str(tiny_llama), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["schema", "path", "kind", "description", "architecture", "parameters", "dtypes",
                         "total_bytes", "layout", "adapter", "missing", "problems", "notes", "files"]
    assert set(doc["layout"]) == {"format", "tp", "pp", "dp", "zero_stage", "weight_files", "ranks",
                                  "iteration"}
    assert all(list(e) == ["path", "role", "inference", "resume", "editable", "pickle", "pickle_globals", "bytes",
                           "detail"] for e in doc["files"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "post_training.ckpt", "inspect", *args], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT, timeout=120)


@pytest.mark.parametrize("case", ["unknown", "truncated"])
def test_cli_errors(case, tiny_llama, tmp_path):
    if case == "unknown":
        for n in ("a.txt", "notes.md", "run.log"):
            (tmp_path / n).write_text("x")
        target = tmp_path
        want = f"error: no checkpoint recognised in {tmp_path}: found 3 files (a.txt, notes.md, run.log)"
    else:
        target = tmp_path / "model.safetensors"
        target.write_bytes((tiny_llama / "model.safetensors").read_bytes()[:64])
        want = f"error: {target}: truncated safetensors header"
    res = run_cli(str(target))
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(want), res.stderr
