"""Dist checkpoints reshard: saved at TP=2 they load at TP=1 and PP=2; saved at PP=2 they load
at TP=2, all with the logits of the original model. Real ranks over gloo."""
import pytest
import torch

from dist_utils import torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tiny_llama, tmp_path_factory):
    base = tmp_path_factory.mktemp("reshard")
    ref = base / "ref.pt"
    torchrun(1, "ckpt.py", "load", "--load", str(tiny_llama), "--out", str(ref))  # HF dir via --load
    torchrun(2, "ckpt.py", "save", "--hf-dir", str(tiny_llama), "--save", str(base / "tp2"),
             "--iteration", "10", "--tp", "2", "--out", str(base / "tp2.pt"))
    torchrun(2, "ckpt.py", "save", "--hf-dir", str(tiny_llama), "--save", str(base / "pp2"),
             "--iteration", "10", "--pp", "2")
    return base, torch.load(ref)["logits"]


@pytest.mark.parametrize("src,tp,pp", [("tp2", 1, 1), ("tp2", 1, 2), ("pp2", 2, 1)])
def test_load_at_other_layout(saved, src, tp, pp):
    base, ref = saved
    out = base / f"{src}_as_tp{tp}pp{pp}.pt"
    torchrun(tp * pp, "ckpt.py", "load", "--load", str(base / src), "--tp", str(tp), "--pp", str(pp),
             "--out", str(out))
    got = torch.load(out)["logits"]
    diff = (got - ref).abs().max().item()
    print(f"{src} -> TP={tp} PP={pp}: max |logits - original| = {diff:.2e}")
    assert diff < 1e-4


def test_saved_layout_is_megatron_lm(saved):
    base, ref = saved
    root = base / "tp2"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "10"
    it = root / "iter_0000010"
    assert (it / "common.pt").is_file() and list(it.glob("*.distcp"))
    assert (it / "metadata.json").is_file() and (it / "toolkit_meta.json").is_file()
    assert (root / "hf_config" / "config.json").is_file()
    assert torch.allclose(torch.load(base / "tp2.pt")["logits"], ref, atol=1e-4)


# "fp8" includes the KV-cache quantizers of "fp8-kv" (dropped for suite time; the script-level
# TP=2 FP8 + FP8-KV reload is in test_quantize.py).
@pytest.mark.parametrize("quant", ["fp8"])
def test_quantized_tp2_checkpoint_loads_at_tp1(tiny_llama, tmp_path, quant):
    """Quantizer scales calibrated at TP=2 (FP8 KV cache alone, or FP8 weights + activations +
    KV cache; amax synced over TP) come back at TP=1 with the same values and logits: the
    quantizer state reshards with the model."""
    saved, loaded = tmp_path / "saved.pt", tmp_path / "loaded.pt"
    torchrun(2, "ckpt.py", "save", "--hf-dir", str(tiny_llama), "--save", str(tmp_path / "q"),
             "--tp", "2", "--quantize", quant, "--out", str(saved))
    torchrun(1, "ckpt.py", "load", "--load", str(tmp_path / "q"), "--out", str(loaded))
    a, b = torch.load(saved), torch.load(loaded)
    kv = a["amax"][0]
    assert any("k_bmm_quantizer" in k for k in kv) and all(v.max().item() > 0 for v in kv.values())
    assert any("weight_quantizer" in k for k in kv) == (quant == "fp8")
    assert all(torch.equal(a["amax"][1][k], v) for k, v in kv.items())  # TP ranks agree
    assert all(torch.equal(b["amax"][0][k], v) for k, v in kv.items())
    assert (a["logits"] - b["logits"]).abs().max().item() < 1e-4


def test_int8_per_channel_scales_follow_the_weights_across_tp(tiny_llama, tmp_path):
    """Per-channel INT8 weight scales saved at TP=2 load at TP=1 in the weights' channel order:
    column-parallel scales concatenate over ranks, linear_fc1's (gate/up fused) go through
    megatron's SwiGLU layout like its weight (ModelOpt meant to, see quant_modules), and
    replicated scales agree. (Logits differ by ~0.06: fake-quant rounding near INT8 midpoints under
    another reduction order, explained in the quantization issue's note.)"""
    saved, loaded = tmp_path / "saved.pt", tmp_path / "loaded.pt"
    torchrun(2, "ckpt.py", "save", "--hf-dir", str(tiny_llama), "--save", str(tmp_path / "q"),
             "--tp", "2", "--quantize", "int8", "--out", str(saved))
    torchrun(1, "ckpt.py", "load", "--load", str(tmp_path / "q"), "--out", str(loaded))
    r0, r1 = torch.load(saved)["amax"][:2]
    one = torch.load(loaded)["amax"][0]

    def swiglu(a, b):  # [gate_r; up_r] per rank -> [gate_0, gate_1, up_0, up_1]
        return torch.cat([a[: len(a) // 2], b[: len(b) // 2], a[len(a) // 2:], b[len(b) // 2:]])

    assert any("linear_fc1.weight_quantizer" in k for k in one)
    for k, v in one.items():
        if r0[k].shape == v.shape:
            assert torch.equal(r0[k], v) and torch.equal(r1[k], v), k
        else:
            want = swiglu(r0[k], r1[k]) if "linear_fc1" in k else torch.cat([r0[k], r1[k]])
            assert torch.equal(want, v), k
