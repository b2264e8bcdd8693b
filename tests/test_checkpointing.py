"""Dist checkpoints in process (TP=1): round trip, layout, strictness and clear errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from post_training.io import layout as cio
from post_training.checkpointing import save_checkpoint
from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.inference import stage_forward
from post_training.config import ModelConfig
from post_training.utils import UsageError

IDS = torch.arange(5, 30).unsqueeze(0)


def logits(model):
    with torch.inference_mode():
        return stage_forward(model, IDS, None)


def load(runtime, path, **kw):
    return setup_model(SourceConfig(load=str(path), **kw), ModelConfig(), runtime)[0]


@pytest.fixture(scope="module")
def saved(tiny_llama, runtime, tmp_path_factory):
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    root = tmp_path_factory.mktemp("ck") / "run"
    save_checkpoint(model, runtime, root, 7, hf_dir=tiny_llama)
    return model, root


def fresh_copy(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


def test_round_trip_and_record(saved, runtime):
    model, root = saved
    assert torch.equal(logits(load(runtime, root)), logits(model))
    meta = json.loads((root / "iter_0000007" / "toolkit_meta.json").read_text())
    assert meta["iteration"] == 7 and meta["parallel"]["tp"] == 1 and meta["architecture"] == "LlamaForCausalLM"
    assert meta["contents"] == {"weights": True, "optimizer": False, "scheduler": False, "rng": False}
    assert {"torch", "megatron-core", "nvidia-modelopt"} <= meta["libraries"].keys()
    assert all(rec["bytes"] > 0 for rec in meta["files"].values())
    # an iteration directory loads directly too
    assert torch.equal(logits(load(runtime, root / "iter_0000007")), logits(model))


def test_load_hf_dir_falls_back_to_import(tiny_llama, saved, runtime):
    assert torch.equal(logits(load(runtime, tiny_llama)), logits(saved[0]))


def test_teacher_load_leaves_student_alone(saved, tiny_dirs, runtime):
    student, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_dirs["qwen3"])), ModelConfig(), runtime)
    before = {k: v.clone() for k, v in student.state_dict().items() if isinstance(v, torch.Tensor)}
    teacher = load(runtime, saved[1])
    assert torch.equal(logits(teacher), logits(saved[0]))
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", ["missing_path", "tracker_dangling", "tracker_garbage", "truncated",
                                  "corrupt", "not_a_checkpoint"])
def test_clear_errors(case, saved, runtime, tmp_path):
    root = fresh_copy(saved, tmp_path)
    it = root / "iter_0000007"
    shard = sorted(it.glob("*.distcp"))[0]
    if case == "missing_path":
        root, match = tmp_path / "nope", "not found"
    elif case == "tracker_dangling":
        (root / cio.TRACKER).write_text("9")
        match = "points to iter_0000009, which does not exist"
    elif case == "tracker_garbage":
        (root / cio.TRACKER).write_text("latest!")
        match = "not an iteration number"
    elif case == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        match = f"{shard.name} is truncated"
    elif case == "corrupt":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        match = f"{shard.name} is corrupt"
    else:
        root = tmp_path / "plain"
        root.mkdir()
        (root / "notes.txt").write_text("hi")
        match = "is not a checkpoint"
    with pytest.raises(UsageError, match=match):
        load(runtime, root)


def test_other_architecture_names_tensor_and_shapes(saved, runtime, tmp_path, smollm2_dir):
    other = make_tiny(tmp_path / "wide", "llama", smollm2_dir)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig

    from post_training.checkpointing.load import load_model_checkpoint
    from post_training.model_builder import build_model

    wide = build_model(AutoConfig.from_pretrained(other), runtime, ModelConfig())
    with pytest.raises(UsageError, match=r"\(saved from LlamaForCausalLM\): decoder.layers.mlp.linear_fc[12].weight is "
                       r"\(4, \d+, \d+\) in the checkpoint, \(4, \d+, \d+\) in the model"):
        load_model_checkpoint(saved[1], wide, runtime)


def test_missing_keys_strict_and_partial(saved, runtime, tiny_dirs, capsys):
    from transformers import AutoConfig

    from post_training.checkpointing.load import load_model_checkpoint
    from post_training.model_builder import build_model

    qwen2 = build_model(AutoConfig.from_pretrained(tiny_dirs["qwen2"]), runtime, ModelConfig())  # has qkv bias
    with pytest.raises(UsageError, match=r"model tensor\(s\) not in the checkpoint: .*linear_qkv.bias"):
        load_model_checkpoint(saved[1], qwen2, runtime)
    load_model_checkpoint(saved[1], qwen2, runtime, strictness="log_all")
    assert "partial load" in capsys.readouterr().out
    src = saved[0].state_dict()
    assert torch.equal(qwen2.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"],
                       src["decoder.layers.0.mlp.linear_fc1.weight"])


def test_newer_modelopt_state_is_refused(saved, runtime, tmp_path, monkeypatch):
    import modelopt

    from post_training.checkpointing.load import check_modelopt_version

    it = tmp_path / "it"
    (it / "modelopt_state").mkdir(parents=True)
    from megatron.core import dist_checkpointing

    dist_checkpointing.save({"modelopt_version": "99.0.0", "modelopt_state_dict": []}, str(it / "modelopt_state"))
    with pytest.raises(UsageError, match="nvidia-modelopt 99.0.0.*older"):
        check_modelopt_version(it)
    monkeypatch.setattr(modelopt, "__version__", "99.1.0")
    check_modelopt_version(it)  # a newer installed ModelOpt reads it


def test_rotation_keeps_the_tracked_and_newest(tmp_path):
    root = tmp_path / "r"
    for i in (1, 2, 3, 4, 5):
        (root / cio.iter_dir_name(i)).mkdir(parents=True)
    cio.write_tracker(root, 3)
    removed = {p.name for p in cio.rotate(root, 2)}
    assert removed == {"iter_0000001", "iter_0000002"}
    assert cio.list_iterations(root) == [3, 4, 5]
    with pytest.raises(UsageError):
        cio.rotate(root, 0)


def test_quantized_checkpoint_keeps_kv_amax(tiny_llama, runtime, tmp_path):
    """ModelOpt state + KV-cache quantizer amax survive save_checkpoint / --load (the anchor bug
    lost core_attention.*_bmm_quantizer._amax)."""
    import modelopt.torch.opt as mto
    import modelopt.torch.quantization as mtq

    cfg = mtq.update_quant_cfg_with_kv_cache_quant(mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG["quant_cfg"])
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    calib = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(model, cfg, lambda m: stage_forward(m, calib, None))
    amax = [l.self_attention.core_attention.k_bmm_quantizer.amax.clone() for l in model.decoder.layers]
    assert all(a.item() > 0 for a in amax)
    save_checkpoint(model, runtime, tmp_path / "q", 1, hf_dir=tiny_llama)
    meta = json.loads((tmp_path / "q" / "iter_0000001" / "toolkit_meta.json").read_text())
    assert "quantize" in meta["modelopt_modes"]
    assert (tmp_path / "q" / "iter_0000001" / "modelopt_state").is_dir()

    restored = load(runtime, tmp_path / "q")
    assert mto.ModeloptStateManager.is_converted(restored)
    got = [l.self_attention.core_attention.k_bmm_quantizer.amax for l in restored.decoder.layers]
    assert all(torch.equal(a, b) for a, b in zip(amax, got))
    assert torch.equal(logits(restored), logits(model))
