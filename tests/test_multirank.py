"""Real ranks over gloo: TP=2 and PP=2 (and both) reproduce TP=1 logits and greedy tokens."""
import pytest

from workers import forward

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_llama, runtime):
    return forward.run(str(tiny_llama), runtime)  # TP=1, in this process


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_matches_tp1(reference, request, tp, pp):
    got = request.getfixturevalue({(2, 1): "mr_tp2", (1, 2): "mr_pp2", (2, 2): "mr_2x2"}[(tp, pp)])["forward"]
    diff = (got["logits"] - reference["logits"]).abs().max().item()
    print(f"TP={tp} PP={pp}: max |logits - TP1| = {diff:.2e}")
    assert diff < 1e-4
    assert got["tokens"] == reference["tokens"]
