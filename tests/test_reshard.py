"""Dist checkpoints reshard: saved at TP=2 they load at TP=1 and PP=2; saved at PP=2 they load
at TP=2, all with the logits of the original model. Real ranks over gloo (the shared launches of
conftest's mr_* fixtures); TP=1 loads run in this process."""
import pytest
import torch

from workers import ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref(tiny_llama, runtime):
    return ckpt.outputs(ckpt.build(runtime, load=str(tiny_llama)), runtime)["logits"]  # HF dir via --load


def _tp1_load(runtime, root) -> dict:
    return ckpt.outputs(ckpt.build(runtime, load=str(root)), runtime)


@pytest.mark.parametrize("src,tp,pp", [("tp2", 1, 1), ("tp2", 1, 2), ("pp2", 2, 2)])
def test_load_at_other_layout(ref, runtime, mr_dir, request, src, tp, pp):
    if (tp, pp) == (1, 1):
        got = _tp1_load(runtime, mr_dir / src)["logits"]
    else:
        got = request.getfixturevalue({(1, 2): "mr_pp2", (2, 2): "mr_2x2"}[(tp, pp)])[f"load:{src}"]["logits"]
    diff = (got - ref).abs().max().item()
    print(f"{src} -> TP={tp} PP={pp}: max |logits - original| = {diff:.2e}")
    assert diff < 1e-4


def test_saved_layout_is_megatron_lm(ref, mr_dir, mr_tp2):
    root = mr_dir / "tp2"
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "10"
    it = root / "iter_0000010"
    assert (it / "common.pt").is_file() and list(it.glob("*.distcp"))
    assert (it / "metadata.json").is_file() and (it / "toolkit_meta.json").is_file()
    assert (root / "hf_config" / "config.json").is_file()
    assert torch.allclose(mr_tp2["save:tp2"]["logits"], ref, atol=1e-4)


# "fp8" includes the KV-cache quantizers of "fp8-kv" (dropped for suite time; the script-level
# TP=2 FP8 + FP8-KV reload is in test_quantize.py).
@pytest.mark.parametrize("quant", ["fp8"])
def test_quantized_tp2_checkpoint_loads_at_tp1(runtime, mr_dir, mr_tp2, quant):
    """Quantizer scales calibrated at TP=2 (FP8 KV cache alone, or FP8 weights + activations +
    KV cache; amax synced over TP) come back at TP=1 with the same values and logits: the
    quantizer state reshards with the model."""
    a, b = mr_tp2[f"save:{quant}"], _tp1_load(runtime, mr_dir / quant)
    kv = a["amax"][0]
    assert any("k_bmm_quantizer" in k for k in kv) and all(v.max().item() > 0 for v in kv.values())
    assert any("weight_quantizer" in k for k in kv) == (quant == "fp8")
    assert all(torch.equal(a["amax"][1][k], v) for k, v in kv.items())  # TP ranks agree
    assert all(torch.equal(b["amax"][0][k], v) for k, v in kv.items())
    assert (a["logits"] - b["logits"]).abs().max().item() < 1e-4


def test_int8_per_channel_scales_follow_the_weights_across_tp(runtime, mr_dir, mr_tp2):
    """Per-channel INT8 weight scales saved at TP=2 load at TP=1 in the weights' channel order:
    column-parallel scales concatenate over ranks, linear_fc1's (gate/up fused) go through
    megatron's SwiGLU layout like its weight (ModelOpt meant to, see runtime/fixes.py), and
    replicated scales agree. (Logits differ by ~0.06: fake-quant rounding near INT8 midpoints under
    another reduction order, explained in the quantization issue's note.)"""
    r0, r1 = mr_tp2["save:int8"]["amax"][:2]
    one = _tp1_load(runtime, mr_dir / "int8")["amax"][0]

    def swiglu(a, b):  # [gate_r; up_r] per rank -> [gate_0, gate_1, up_0, up_1]
        return torch.cat([a[: len(a) // 2], b[: len(b) // 2], a[len(a) // 2:], b[len(b) // 2:]])

    assert any("linear_fc1.weight_quantizer" in k for k in one)
    for k, v in one.items():
        if r0[k].shape == v.shape:
            assert torch.equal(r0[k], v) and torch.equal(r1[k], v), k
        else:
            want = swiglu(r0[k], r1[k]) if "linear_fc1" in k else torch.cat([r0[k], r1[k]])
            assert torch.equal(want, v), k
