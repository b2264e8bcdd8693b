"""The KV cache (post_training.inference.KVCache): a k-token chunk after a cached prefix gives the
uncached forward's logits at all k positions; truncating and continuing equals never having
appended; both key formats (rotated: the CPU fast path; unrotated: megatron's), honoured with
and without the fast paths and inference mode; at TP=1 in-process and TP=2 over gloo."""
from __future__ import annotations

import contextlib

import pytest
import torch

from post_training.config import ModelConfig, SourceConfig
from post_training.inference import KVCache, stage_forward
from post_training.model_builder import setup_model
from post_training.runtime import fast_layer, fastpath, patches

VOCAB = 49152
TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_llama, runtime):
    return setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)[0]


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _path(fast: bool, inference: bool):
    """Fast paths installed or removed; inference mode or plain no_grad."""
    if not fast:
        fastpath.remove()
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            yield
    finally:
        if not fast:
            fastpath.apply()


def _lean_calls(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real = fast_layer.layer_forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not NotImplemented)
        return out

    monkeypatch.setattr(fast_layer, "layer_forward", spy)  # called from the block loop
    return calls


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("keys_rotated", [True, False])
@pytest.mark.parametrize("fast,inference", [(True, True), (True, False), (False, True)])
def test_chunk_after_prefix_equals_uncached(model, monkeypatch, keys_rotated, fast, inference):
    """Prefix 9, then a 4-token chunk with all logits, then one decode step: every position's
    logits are the uncached forward's, whichever path runs (the lean layer only for rotated
    keys with the fast paths under inference mode)."""
    ids = _ids(1, 14)
    with torch.no_grad():
        full = stage_forward(model, ids, None)
    calls = _lean_calls(monkeypatch)
    with _path(fast, inference):
        cache = KVCache(1, 16, keys_rotated=keys_rotated)
        prefix = cache.forward(model, ids[:, :9], all_logits=True)
        chunk = cache.forward(model, ids[:, 9:13], all_logits=True)
        last = cache.forward(model, ids[:, 13:])
    assert cache.length == 14 and cache.capacity == 16 and cache.keys_rotated == keys_rotated
    assert prefix.shape[1] == 9 and chunk.shape[1] == 4 and last.shape[1] == 1
    assert _diff(prefix, full[:, :9]) < TOL
    assert _diff(chunk, full[:, 9:13]) < TOL
    assert _diff(last, full[:, 13:]) < TOL
    lean = keys_rotated and fast and inference
    assert bool(calls) == (fast and inference)  # the block loop runs only on the fast path
    assert all(c == lean for c in calls)


def test_formats_agree_and_default_is_rotated_on_cpu(model):
    """The lean path (rotated keys) and megatron's path (fast paths removed, unrotated keys)
    give the same chunk logits; a CPU runtime's default cache holds rotated keys."""
    ids = _ids(2, 12)

    def chunk_logits(keys_rotated):
        cache = KVCache(1, 12, keys_rotated=keys_rotated)
        cache.forward(model, ids[:, :7])
        return cache.forward(model, ids[:, 7:], all_logits=True)

    with _path(True, True):
        rotated = chunk_logits(True)
    with _path(False, True):
        unrotated = chunk_logits(False)
    assert _diff(rotated, unrotated) < TOL
    assert KVCache(1, 4).keys_rotated


@pytest.mark.parametrize("keys_rotated,fast", [(True, True), (False, False), (True, False)])
def test_truncate_then_continue_equals_never_appended(model, keys_rotated, fast):
    """Prefix, a rejected 4-token draft, truncate to the prefix, then other tokens: the same
    logits as a cache that never saw the draft (bit for bit on one path), and the uncached
    forward's; decode steps after it too."""
    ids, draft = _ids(3, 15), _ids(4, 4)
    with torch.no_grad():
        full = stage_forward(model, ids, None)
    with _path(fast, True):
        rolled = KVCache(1, 16, keys_rotated=keys_rotated)
        rolled.forward(model, ids[:, :8])
        rolled.forward(model, draft, all_logits=True)
        rolled.truncate(8)
        assert rolled.length == 8
        a = [rolled.forward(model, ids[:, 8:12], all_logits=True),
             *(rolled.forward(model, ids[:, i:i + 1]) for i in range(12, 15))]
        fresh = KVCache(1, 16, keys_rotated=keys_rotated)
        fresh.forward(model, ids[:, :8])
        b = [fresh.forward(model, ids[:, 8:12], all_logits=True),
             *(fresh.forward(model, ids[:, i:i + 1]) for i in range(12, 15))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert _diff(torch.cat(a, 1), full[:, 8:15]) < TOL


def test_bounds_and_format_requirements(model):
    cache = KVCache(1, 6)
    with torch.inference_mode():
        cache.forward(model, _ids(5, 4))
        with pytest.raises(ValueError, match="do not fit"):
            cache.forward(model, _ids(6, 3))
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(5)
    cache.truncate(0)
    assert cache.length == 0
    patches.remove("kv_cache_rotated_keys")
    try:  # rotated keys need the patch that makes megatron's path honour them
        with pytest.raises(RuntimeError, match="kv_cache_rotated_keys"):
            KVCache(1, 4, keys_rotated=True)
        assert not KVCache(1, 4).keys_rotated  # the default follows
    finally:
        patches.apply("kv_cache_rotated_keys")


def test_tp2_over_gloo(mr_tp2):
    """The shared 2-rank launch (TP=2): both formats give the uncached TP=2 logits for the chunk,
    after a roll-back and for a decode step, and agree with each other; greedy generation
    (through KVCache) matches the uncached TP=2 forward's first token."""
    res = mr_tp2["forward"]
    r, p = res["kv"], res["kv"]["prefix"]
    for fmt in ("rotated", "unrotated"):
        got = r[fmt]
        assert _diff(got["chunk"], r["full"][:, p:]) < TOL, fmt
        assert torch.equal(got["again"], got["chunk"]), fmt
        assert _diff(got["step"], r["step_ref"]) < TOL, fmt
        assert got["length"] == r["full"].shape[1] + 1
    assert _diff(r["rotated"]["chunk"], r["unrotated"]["chunk"]) < TOL
    assert res["tokens"][0] == int(res["logits"][0, -1].argmax())
