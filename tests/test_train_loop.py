"""The training loop (post_training/train_loop.py) on the tiny model: the loss falls, logs /
jsonl / PNG are written, a resumed run reproduces the uninterrupted one exactly, --finetune and
--no-load-optim do what they say, a non-finite loss stops the run and keeps the last
checkpoint, QAT trains a quantized checkpoint with its calibrated scales, and TP=2 / PP=2
reproduce the TP=1 losses through the loop (the shared multi-rank launches)."""
import json
import math

import pytest
import torch

from post_training.io import layout as cio
from post_training.train_loop import NonFiniteLoss
from post_training.utils import UsageError
from workers import loop

# TP / PP vs TP=1 through the loop: the step's own tolerance (tests/test_training.py), compounded
# over 6 steps with different data each step.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def ref(tiny_llama, runtime, tmp_path_factory):
    """6 iterations, eval every 3, save every 3, jsonl and PNG: the TP=1 reference and the
    checkpoints the resume tests start from."""
    d = tmp_path_factory.mktemp("loop")
    out = loop.run(str(tiny_llama), runtime, iters=6, save=str(d / "ck"), save_interval=3, eval_interval=3,
                   log_file=str(d / "log.jsonl"), plot=True)
    return d, out


def test_loop_logs_evaluates_and_saves(ref, capsys):
    d, out = ref
    assert out["iteration"] == [1, 2, 3, 4, 5, 6]
    assert [it for it, _ in out["valid"]] == [3, 6] and out["valid"][1][1] < out["valid"][0][1]
    assert out["lr"][0] == 0.0 and out["lr"][1] == pytest.approx(2e-3)  # warmup 1 iteration, then cosine
    recs = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["train"] * 3 + ["valid"] + ["train"] * 3 + ["valid"]
    assert {"lr", "grad_norm", "tokens_per_s", "consumed_samples", "memory"} <= set(recs[0])
    assert recs[-2]["consumed_samples"] == 24 and recs[0]["losses"]["lm loss"] == out["loss"][0]
    png = d / "ck" / "loss_curves.png"
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cio.read_tracker(d / "ck").name == "iter_0000006" and (d / "ck" / "iter_0000003").is_dir()
    meta = cio.read_meta(d / "ck" / "iter_0000003")
    assert meta["train_state"] == {"iteration": 3, "consumed_samples": 12}
    assert meta["contents"] == {"weights": True, "optimizer": True, "scheduler": True, "rng": True}


def test_format_of_the_log_lines():
    from post_training.train_log import format_eval_line, format_train_line

    rec = {"consumed_samples": 8, "ms_per_iter": 12.5, "tokens_per_s": 1000.0, "lr": 1e-4,
           "global_batch_size": 4, "losses": {"lm loss": 2.3125, "logits distillation loss": 0.5},
           "grad_norm": 1.5, "memory": "memory rss 1.00 GiB peak 1.00 GiB"}
    line = format_train_line(2, 10, rec)
    assert "iteration        2/      10 |" in line and "| lm loss: 2.312500E+00 |" in line
    assert "| logits distillation loss: 5.000000E-01 |" in line and "grad norm: 1.500" in line
    assert "learning rate: 1.000000E-04" in line and "tokens/s: 1000" in line
    ev = format_eval_line(4, {"lm loss": math.log(10.0)})
    assert ev.startswith("validation loss at iteration 4 | lm loss value: 2.302585E+00 | lm loss PPL: 1.000000E+01")


def test_loss_decreases_over_20_steps(tiny_llama, runtime):
    out = loop.run(str(tiny_llama), runtime, iters=20, lr=1e-2, global_batch_size=2, micro_batch_size=2)
    first, last = sum(out["loss"][:3]) / 3, sum(out["loss"][-3:]) / 3
    print("losses:", [round(x, 3) for x in out["loss"]])
    assert last < first - 2.0, out["loss"]  # from ~ln(49152) towards ln(64) of the token range


def test_resume_reproduces_the_uninterrupted_run(ref, tiny_llama, runtime):
    """--load of the iteration-3 checkpoint: iterations 4-6 give exactly the losses, grad norms
    and learning rates of the run that never stopped (optimizer, scheduler, RNG, data position)."""
    d, full = ref
    out = loop.run(str(tiny_llama), runtime, iters=6, load=str(d / "ck" / "iter_0000003"), log_file=str(d / "r.jsonl"))
    assert out["iteration"] == [4, 5, 6]
    assert out["loss"] == full["loss"][3:] and out["grad_norm"] == full["grad_norm"][3:]
    assert out["lr"] == full["lr"][3:]


def test_finetune_and_no_load_optim(ref, tiny_llama, runtime):
    """--finetune: the checkpoint's weights at iteration 0 (warmup again, lr 0 first). --no-load-optim:
    iteration and schedule continue, the Adam moments start fresh, so the second step differs
    from the full resume's while the first (before any update) is the same (--no-load-rng rides
    along: without dropout the RNG does not change the losses)."""
    d, full = ref
    fin = loop.run(str(tiny_llama), runtime, iters=2, load=str(d / "ck" / "iter_0000003"), finetune=True)
    assert fin["iteration"] == [1, 2] and fin["lr"][0] == 0.0
    fresh = loop.run(str(tiny_llama), runtime, iters=5, load=str(d / "ck" / "iter_0000003"), no_load_optim=True,
                     no_load_rng=True, schedule="checkpoint")
    assert fresh["iteration"] == [4, 5] and fresh["lr"] == full["lr"][3:5]
    assert fresh["loss"][0] == full["loss"][3] and fresh["loss"][1] != full["loss"][4]


def test_longer_run_on_a_checkpoint_needs_a_schedule_choice(ref, tiny_llama, runtime):
    """Another --train-iters changes the LR decay: as in Megatron-LM, one line asks whose schedule
    wins; --override-opt-param-scheduler decays over the new length from the saved position."""
    d, full = ref
    with pytest.raises(UsageError, match="--override-opt-param-scheduler .* --use-checkpoint-opt-param-scheduler"):
        loop.run(str(tiny_llama), runtime, iters=8, load=str(d / "ck" / "iter_0000006"))
    longer = loop.run(str(tiny_llama), runtime, iters=7, load=str(d / "ck" / "iter_0000006"), schedule="override")
    # the 7-iteration cosine at its 7th step sits between the 6-iteration run's last lr and min lr,
    # where the checkpoint's schedule (decay over) would give min lr itself
    assert longer["iteration"] == [7] and 2e-3 / 10 < longer["lr"][0] < full["lr"][-1]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_llama, runtime, tmp_path):
    with pytest.raises(NonFiniteLoss) as e:
        loop.run(str(tiny_llama), runtime, iters=6, save=str(tmp_path / "ck"), save_interval=2, poison_at=3)
    assert str(e.value).startswith("non-finite lm loss (nan) at iteration 3:")
    assert "last checkpoint: " + str(tmp_path / "ck" / "iter_0000002") in str(e.value)
    assert cio.read_tracker(tmp_path / "ck").name == "iter_0000002"
    assert sorted(p.name for p in (tmp_path / "ck").glob("iter_*")) == ["iter_0000002"]


def test_nothing_left_to_train(ref, tiny_llama, runtime):
    from post_training.utils import UsageError

    d, _ = ref
    with pytest.raises(UsageError, match="--load is at iteration 6, --train-iters is 6"):
        loop.run(str(tiny_llama), runtime, iters=6, load=str(d / "ck"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_parallel_loop_matches_tp1(ref, request, layout):
    """The same 6 iterations (eval included) at TP=2, PP=2 and DP=2 over gloo ranks (DP=2: the
    TP=2 launch re-laid out as 2 data-parallel ranks, 1 microbatch each instead of 2)."""
    _, tp1 = ref
    got = request.getfixturevalue("mr_tp2" if layout == "dp2" else f"mr_{layout}")["loop:dp" if layout == "dp2" else "loop"]
    rel = max(abs(a - b) / b for a, b in zip(got["loss"], tp1["loss"]))
    vrel = max(abs(a[1] - b[1]) / b[1] for a, b in zip(got["valid"], tp1["valid"]))
    print(f"{layout}: max rel diff vs TP=1 through the loop: loss {rel:.1e}, valid {vrel:.1e}")
    assert got["iteration"] == tp1["iteration"] and [v[0] for v in got["valid"]] == [3, 6]
    assert rel < LOSS_RTOL and vrel < LOSS_RTOL


def test_optimizer_layout_mismatch_suggests_no_load_optim(ref, tiny_llama, runtime):
    """A LoRA run resuming a full fine-tune's checkpoint: the optimizer state holds the base
    weights' moments, the new optimizer only the adapters' -> one line naming --no-load-optim."""
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model
    from post_training.train_loop import apply_lora
    from post_training.utils import UsageError

    d, _ = ref
    ck = str(d / "ck" / "iter_0000003")
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama), load=ck),
                              ModelConfig(seq_length=16), runtime, inference=False)
    assert apply_lora(model, 4, seed=1).startswith("LoRA rank 4: ")
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(UsageError, match="pass --no-load-optim") as e:
        loop.run(str(tiny_llama), runtime, iters=5, load=ck, model=model)
    assert "\n" not in str(e.value)
    out = loop.run(str(tiny_llama), runtime, iters=6, load=ck, model=model, no_load_optim=True)
    assert out["iteration"] == [4, 5, 6] and all(math.isfinite(x) for x in out["loss"])


def test_qat_on_a_quantized_checkpoint(tiny_llama, runtime, tmp_path):
    """--load of a PTQ (FP8) checkpoint: training starts at iteration 0 with every quantizer
    enabled and the calibrated amax untouched; the trained checkpoint reloads with them (what
    generate / evaluate do) and exports as FP8."""
    from workers.ckpt import build, save
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model
    from post_training.train_loop import quantizer_summary

    def amax(m):
        return {n: q.amax.clone() for n, q in m.named_modules()
                if n.endswith("_quantizer") and getattr(q, "amax", None) is not None}

    ptq = build(runtime, str(tiny_llama), quantize="fp8")
    save(ptq, runtime, str(tmp_path / "ptq"), None, str(tiny_llama))
    calibrated = amax(ptq)
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama), load=str(tmp_path / "ptq")),
                              ModelConfig(seq_length=16), runtime, inference=False)
    summary = quantizer_summary(model)
    assert summary.startswith("QAT: ") and "scales kept from calibration" in summary
    out = loop.run(str(tiny_llama), runtime, iters=3, load=str(tmp_path / "ptq"), save=str(tmp_path / "qat"),
                   model=model)
    assert out["iteration"] == [1, 2, 3] and all(math.isfinite(x) for x in out["loss"])
    assert out["loss"][-1] < out["loss"][0]
    after = amax(model)
    assert calibrated.keys() == after.keys() and len(after) > 10
    assert all(torch.equal(calibrated[k], after[k]) for k in after)
    reloaded, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama), load=str(tmp_path / "qat")),
                                 ModelConfig(seq_length=16), runtime)
    assert quantizer_summary(reloaded) == summary
    assert all(torch.equal(after[k], v) for k, v in amax(reloaded).items())
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters())
    from post_training.config import ExportConfig
    from post_training.export import export_model

    export_model(reloaded, runtime, tiny_llama, ExportConfig(export_dir=str(tmp_path / "hf")), torch.float32)
    hf_quant = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())
    assert hf_quant["quantization"]["quant_algo"] == "FP8"


def test_bad_input_is_one_line(tiny_llama):
    from dist_utils import clean_env, run_script
    from test_cli import assert_one_line_error

    env = clean_env(HF_MODEL_CKPT=str(tiny_llama), DP="2")
    assert_one_line_error(run_script("finetune.sh", "--global-batch-size", "2", "--micro-batch-size", "2", env=env),
                          "--global-batch-size (2) must be divisible by --micro-batch-size * DP (2 * 2)")
    assert_one_line_error(run_script("distill.sh", "--train-iters", "2", env=env), "--export-kd-teacher-load")


@pytest.mark.slow
def test_finetune_script_end_to_end(tiny_llama, tmp_path):
    """finetune.sh on the built-in chats (packed): log lines, jsonl, PNG, a checkpoint with the
    training state and the next commands."""
    from dist_utils import clean_env, run_script

    res = run_script("finetune.sh", "--seq-length", "64", "--train-iters", "2", "--lr", "1e-3",
                     "--micro-batch-size", "1", "--global-batch-size", "2", "--eval-interval", "2",
                     "--eval-iters", "1", "--finetune-valid-fraction", "0.2", "--log-file", str(tmp_path / "log.jsonl"),
                     env=clean_env(HF_MODEL_CKPT=str(tiny_llama), MLM_MODEL_SAVE=str(tmp_path / "ft")))
    assert res.returncode == 0, res.stderr[-3000:]
    assert " iteration        2/       2 | consumed samples:            4 |" in res.stdout
    assert "| lm loss: " in res.stdout and "validation loss at iteration 2 | lm loss value: " in res.stdout
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["train"] * 2 + ["valid"]
    assert all(math.isfinite(r["losses"]["lm loss"]) for r in recs)
    assert (tmp_path / "ft" / "loss_curves.png").is_file()
    assert cio.read_meta(tmp_path / "ft" / "iter_0000002")["train_state"] == {"iteration": 2, "consumed_samples": 4}
    assert "MLM_MODEL_CKPT=" + str(tmp_path / "ft") + " bash scripts/generate.sh" in res.stdout

