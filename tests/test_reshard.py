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
    return base, torch.load(ref)


@pytest.mark.parametrize("src,tp,pp", [("tp2", 1, 1), ("tp2", 1, 2), ("pp2", 2, 1)])
def test_load_at_other_layout(saved, src, tp, pp):
    base, ref = saved
    out = base / f"{src}_as_tp{tp}pp{pp}.pt"
    torchrun(tp * pp, "ckpt.py", "load", "--load", str(base / src), "--tp", str(tp), "--pp", str(pp),
             "--out", str(out))
    got = torch.load(out)
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
    assert torch.allclose(torch.load(base / "tp2.pt"), ref, atol=1e-4)
