"""Knowledge distillation (post_training/distillation.py, the KD terms of loss_func.py) on tiny
random models: self-distillation is exactly zero, KD pulls the student toward another teacher,
the teacher stays out of the optimizer and the checkpoint, a resume re-attaches it, QAD trains a
fake-quantized student against its fp teacher, TP/PP/DP reproduce TP=1, bad inputs are one line."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from post_training.config import DistillConfig, ModelConfig, SourceConfig
from post_training.distillation import (
    _local_layer_name,
    check_distill_inputs,
    read_kd_cfg,
    setup_distillation,
)
from post_training.utils import UsageError
from workers import distill as kd_worker

KD_NAMES = {"lm loss", "logits distillation loss", "total loss"}


def _yaml(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- inputs, no model


def test_kd_cfg_schema(tmp_path):
    assert read_kd_cfg(None)["logit_layers"] == ["output_layer", "output_layer"]
    cfg = read_kd_cfg(_yaml(tmp_path, "ok.yaml", "intermediate_layer_pairs: [[decoder.layers.1, decoder.layers.2, mse]]\n"
                                                 "logit_kl_topk: 16\nskip_lm_loss: false\n"))
    assert cfg["intermediate_layer_pairs"] == [["decoder.layers.1", "decoder.layers.2", "mse"]]
    assert cfg["logit_kl_topk"] == 16 and cfg["skip_lm_loss"] is False and cfg["kd_loss_scale"] == 1.0
    bad = {
        "kd_los_scale: 2\n": "unknown key kd_los_scale",
        "intermediate_layer_pairs: [[a, b, l1]]\n": "cosine|mse",
        "logit_kl_temperature: 0\n": "logit_kl_temperature must be a positive number",
        "skip_lm_loss: maybe\n": "skip_lm_loss must be true or false",
        "logit_layers: [output_layer]\n": "logit_layers must be",
    }
    for i, (text, msg) in enumerate(bad.items()):
        with pytest.raises(UsageError, match=msg):
            read_kd_cfg(_yaml(tmp_path, f"bad{i}.yaml", text))


def test_teacher_flags_checked_before_any_model(tmp_path, tiny_llama):
    with pytest.raises(UsageError, match="teacher checkpoint not found"):
        DistillConfig(teacher_load=str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="is an HF directory"):
        check_distill_inputs(DistillConfig(teacher_load=str(tiny_llama), teacher_ckpt_format="torch_dist"))
    with pytest.raises(UsageError, match="unknown key 'num_experts'"):
        check_distill_inputs(DistillConfig(teacher_load=str(tiny_llama),
                                           teacher_model_config=_yaml(tmp_path, "t.yaml", "num_experts: 8\n")))
    # an intermediate pair off the last pipeline stage cannot meet the KD loss there
    cfg, rt = SimpleNamespace(num_layers=4), SimpleNamespace(pp=2)
    assert _local_layer_name("decoder.layers.3.mlp", cfg, rt) == "decoder.layers.1.mlp"
    with pytest.raises(UsageError, match="on pipeline stage 0 of 2"):
        _local_layer_name("decoder.layers.1", cfg, rt)


# ----------------------------------------------------------------------------- in process, TP=1


@pytest.fixture(scope="module")
def kd_run(tiny_dirs, runtime):
    """3 logits-only KD steps of the tiny llama toward the tiny qwen2 (default recipe)."""
    return kd_worker.run(str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"]), runtime)


def test_self_distillation_is_zero_with_zero_gradient(tiny_llama, runtime, tmp_path):
    """Teacher = the student's own weights: every KD term and its gradient vanish (the LM loss
    is still reported, without gradient, under skip_lm_loss). Fails without the
    kd_student_lm_loss fix: megatron's in-place cross entropy turns the student's captured fp32
    logits into probabilities."""
    recipe = _yaml(tmp_path, "kd.yaml", "intermediate_layer_pairs: [[decoder.layers.3, decoder.layers.3]]\n")
    out = kd_worker.run(str(tiny_llama), str(tiny_llama), runtime, kd_cfg=recipe, steps=1)
    losses = out["losses"][0]
    assert set(losses) == KD_NAMES | {"intermediate distillation loss"}
    assert abs(losses["logits distillation loss"]) < 1e-7 and abs(losses["intermediate distillation loss"]) < 1e-6
    assert abs(losses["total loss"]) < 1e-6 and losses["lm loss"] > 10  # random 49152-way model
    assert out["grad_norm"][0] < 1e-5, out["grad_norm"]


def test_kd_pulls_the_student_toward_another_teacher(kd_run):
    kl = [s["logits distillation loss"] for s in kd_run["losses"]]
    print("logits KL per step:", kl)
    assert set(kd_run["losses"][0]) == KD_NAMES
    assert kl[0] > 0.05 and all(b < a for a, b in zip(kl, kl[1:])) and kl[-1] < 0.8 * kl[0]
    # skip_lm_loss (the default): the optimized loss is the KD term alone
    assert all(s["total loss"] == pytest.approx(s["logits distillation loss"]) for s in kd_run["losses"])


def test_teacher_is_frozen_outside_optimizer_and_grad_buffers(kd_run, tiny_dirs, runtime):
    from post_training.model_builder import setup_model
    from post_training.utils import unwrap

    model = unwrap(kd_run["model"])
    teacher, ddp = model.teacher_model, kd_run["model"]
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("_teacher_model."))
    n_opt = sum(p.numel() for g in kd_run["optimizer"].param_groups for p in g["params"])
    n_grad = sum(b.grad_data.numel() for b in ddp.buffers)
    print(f"student {n_student} params, teacher {n_teacher}: optimizer holds {n_opt}, grad buffers {n_grad}")
    assert n_teacher > 0 and n_opt == n_student and n_grad == n_student
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # 3 updates later the teacher is the checkpoint it was loaded from
    fresh, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_dirs["qwen2"])), ModelConfig(), runtime)
    ref = fresh.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in teacher.state_dict().items() if not k.endswith("_extra_state"))


def test_checkpoint_holds_the_student_and_a_resume_reattaches_the_teacher(kd_run, tiny_dirs, runtime, tmp_path):
    from megatron.core import dist_checkpointing

    from post_training.checkpointing import save_checkpoint
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from post_training.model_builder import setup_model
    from post_training.training import train_step

    llama, qwen = str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"])
    save_checkpoint(kd_run["model"], runtime, tmp_path / "ckpt", 3, hf_dir=tiny_dirs["llama"])
    it = tmp_path / "ckpt" / "iter_0000003"
    saved = set(dist_checkpointing.load_tensors_metadata(str(it)))
    plain, _, _ = setup_model(SourceConfig(pretrained_model_path=llama), ModelConfig(), runtime)
    wanted = {v.key for v in nested_values(plain.sharded_state_dict())
              if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
    assert saved == wanted  # the student's tensors, nothing of the teacher
    from post_training.io import layout as cio

    assert cio.read_meta(it)["modelopt_modes"] == []  # ModelOpt records no kd_loss mode
    # the loss of the saved weights, then the same from a resumed run (teacher from the flags)
    nxt = train_step(kd_run["model"], kd_run["optimizer"], kd_run["scheduler"], kd_run["batches"], kd_run["batch"])
    resumed = kd_worker.run(llama, qwen, runtime, load=str(tmp_path / "ckpt"), steps=1)
    a, b = nxt.losses, resumed["losses"][0]
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-5) for k in a), (a, b)
    # a dist checkpoint as the teacher (architecture from the HF config it recorded): the saved
    # student taught by itself
    own = kd_worker.run(llama, str(tmp_path / "ckpt"), runtime, load=str(tmp_path / "ckpt"), steps=1)
    assert abs(own["losses"][0]["logits distillation loss"]) < 1e-7 and own["losses"][0]["lm loss"] > 1


@pytest.fixture(scope="module")
def ptq_ckpt(tiny_llama, runtime, tmp_path_factory):
    """The FP8 (weights, activations, KV cache) PTQ checkpoint of the tiny llama."""
    from workers import ckpt

    root = tmp_path_factory.mktemp("ptq") / "fp8"
    ckpt.save(ckpt.build(runtime, str(tiny_llama), quantize="fp8"), runtime, str(root), None, str(tiny_llama))
    return root


def test_qad_fake_quantized_student_learns_from_its_fp_teacher(tiny_llama, runtime, ptq_ckpt):
    """QAD: the student is the FP8 PTQ checkpoint (--load), the teacher the unquantized HF model."""
    from post_training.utils import unwrap

    out = kd_worker.run(str(tiny_llama), str(tiny_llama), runtime, load=str(ptq_ckpt), steps=3, lr=1e-4)
    kl = [s["logits distillation loss"] for s in out["losses"]]
    print("QAD logits KL per step:", kl)
    assert kl[0] > 1e-3 and kl[-1] < 0.9 * kl[0]  # the quantization error (0 unquantized), shrinking
    model = unwrap(out["model"])
    quantizers = [m for n, m in model.named_modules() if n.endswith("_quantizer") and not n.startswith("_teacher")]
    assert any(q.is_enabled for q in quantizers)
    assert not any(n.endswith("_quantizer") for n, _ in model.teacher_model.named_modules())


@pytest.mark.slow
def test_distill_script_qad_end_to_end(tiny_llama, ptq_ckpt, tmp_path):
    """distill.sh with the PTQ checkpoint as student and its HF model as teacher: Megatron's KD
    log lines, and a checkpoint that is the quantized student alone (it loads as one)."""
    from dist_utils import clean_env, run_script

    from post_training.io import layout as cio

    res = run_script("distill.sh", "--export-kd-teacher-load", str(tiny_llama), "--seq-length", "64",
                     "--train-iters", "2", "--lr", "1e-4", "--micro-batch-size", "1", "--global-batch-size", "2",
                     env=clean_env(MLM_MODEL_CKPT=str(ptq_ckpt), MLM_MODEL_SAVE=str(tmp_path / "qad")))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("lm loss", "logits distillation loss", "total loss"):
        assert f"| {name}: " in res.stdout, res.stdout[-2000:]
    meta = cio.read_meta(tmp_path / "qad" / "iter_0000002")
    assert meta["modelopt_modes"] == cio.read_meta(cio.find_checkpoint(ptq_ckpt))["modelopt_modes"]
    assert "kd_loss" not in meta["modelopt_modes"] and meta["modelopt_modes"]


# ----------------------------------------------------------------------------- bad teachers


@pytest.fixture(scope="module")
def student(tiny_llama, runtime):
    from post_training.model_builder import setup_model

    src = SourceConfig(pretrained_model_path=str(tiny_llama))
    model, tok, _ = setup_model(src, ModelConfig(seq_length=32), runtime, inference=False)
    return model, tok, src


def _attach(student, runtime, **kw):
    model, tok, src = student
    return setup_distillation(model, DistillConfig(**kw), src, ModelConfig(seq_length=32), runtime, tok)


def test_incompatible_teacher_is_one_line(student, runtime, tiny_llama, tmp_path):
    t = str(tiny_llama)
    with pytest.raises(UsageError, match=r"teacher vocabulary \(49280\) differs from the student's \(49152\)"):
        _attach(student, runtime, teacher_load=t,
                teacher_model_config=_yaml(tmp_path, "v.yaml", "padded_vocab_size: 49280\n"))
    pair = _yaml(tmp_path, "kd.yaml", "intermediate_layer_pairs: [[decoder.layers.3, decoder.layers.3]]\n")
    with pytest.raises(UsageError, match=r"equal hidden sizes \(student 64, teacher 128\)"):
        _attach(student, runtime, teacher_load=t, kd_cfg=pair,
                teacher_model_config=_yaml(tmp_path, "h.yaml", "hidden_size: 128\n"))
    with pytest.raises(UsageError, match="'decoder.layers.1.nope' is not a module of the student"):
        _attach(student, runtime, teacher_load=t,
                kd_cfg=_yaml(tmp_path, "n.yaml", "intermediate_layer_pairs: [[decoder.layers.1.nope, decoder.layers.1]]\n"))
    assert not hasattr(student[0], "teacher_model")  # nothing attached by a failed setup


def test_padded_teacher_vocab_is_truncated_on_request(student, runtime, tiny_llama, tmp_path):
    """The same model with its vocabulary padded to 49280: refused, then with --kd-truncate-vocab
    the KL over the common 49152 tokens is exactly zero."""
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded"
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama)
    hf.resize_token_embeddings(49280, mean_resizing=False)
    hf.save_pretrained(padded)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, padded / f)
    with pytest.raises(UsageError, match="--kd-truncate-vocab compares the first 49152 tokens"):
        _attach(student, runtime, teacher_load=str(padded))
    out = kd_worker.run(str(tiny_llama), str(padded), runtime, steps=1, truncate_vocab=True)
    assert abs(out["losses"][0]["logits distillation loss"]) < 1e-7


# ----------------------------------------------------------------------------- TP / PP / DP


@pytest.fixture(scope="module")
def tp1_kd(tiny_dirs, runtime, kd_yaml):
    out = kd_worker.run(str(tiny_dirs["llama"]), str(tiny_dirs["qwen2"]), runtime, kd_cfg=str(kd_yaml))
    return {"losses": out["losses"], "grad_norm": out["grad_norm"]}


@pytest.mark.slow
@pytest.mark.parametrize("layout,key,tp_pp_dp", [("mr_tp2", "distill", (2, 1, 1)), ("mr_tp2", "distill:dp", (1, 1, 2)),
                                                 ("mr_pp2", "distill", (1, 2, 1)), ("mr_2x2", "distill", (2, 2, 1))])
def test_parallel_distillation_matches_tp1(tp1_kd, request, layout, key, tp_pp_dp):
    got = request.getfixturevalue(layout)[key]
    assert got["layout"] == tp_pp_dp
    assert [set(s) for s in got["losses"]] == [set(s) for s in tp1_kd["losses"]]
    assert "intermediate distillation loss" in got["losses"][0]
    rel = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(got["losses"], tp1_kd["losses"]) for k in b)
    norm = max(abs(a - b) / b for a, b in zip(got["grad_norm"], tp1_kd["grad_norm"]))
    print(f"{layout} {key}: max rel diff vs TP=1: losses {rel:.1e}, grad norm {norm:.1e}")
    assert rel < 1e-4 and norm < 1e-4
