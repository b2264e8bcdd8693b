"""Real ranks over gloo: TP=2 and PP=2 (and both) reproduce TP=1 logits and greedy tokens."""
import pytest
import torch

from dist_utils import torchrun


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "tp1.pt"
    torchrun(1, "forward.py", "--hf-dir", str(tiny_llama), "--out", str(out))
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_tp1(tiny_llama, reference, tmp_path, tp, pp):
    out = tmp_path / f"tp{tp}pp{pp}.pt"
    torchrun(tp * pp, "forward.py", "--hf-dir", str(tiny_llama), "--tp", str(tp), "--pp", str(pp),
             "--out", str(out))
    got = torch.load(out)
    diff = (got["logits"] - reference["logits"]).abs().max().item()
    print(f"TP={tp} PP={pp}: max |logits - TP1| = {diff:.2e}")
    assert diff < 1e-4
    assert got["tokens"] == reference["tokens"]
