"""KV-cache quantization of our SDPA core attention through ModelOpt (post_training.quant_modules).

FP8 (E4M3) fake quantization runs on CPU: for non-CUDA tensors ModelOpt's ``scaled_e4m3_impl``
falls back to ``fp8_eager`` (scale, cast to ``torch.float8_e4m3fn``, cast back), which CPU torch
supports, so no INT8 fallback is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.inference.contexts import StaticInferenceContext
from modelopt.torch.opt.plugins.mcore_dist_checkpointing import (
    restore_sharded_modelopt_state,
    save_sharded_modelopt_state,
)
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.utils import safe_load

from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.inference import stage_forward
from post_training.config import ModelConfig
from post_training.quant_modules import QuantSDPAttention

VOCAB = 49152
FP8_KV = mtq.FP8_KV_CFG["quant_cfg"]
# Default FP8 (weights and activations of every linear) plus the FP8 KV cache, as a deployment
# would use it; and the KV cache alone, so that any change in the logits comes from our module.
FP8_W_A_KV_CFG = mtq.update_quant_cfg_with_kv_cache_quant(mtq.FP8_DEFAULT_CFG, FP8_KV)
FP8_KV_ONLY_CFG = mtq.update_quant_cfg_with_kv_cache_quant({"quant_cfg": None}, FP8_KV)


def _build(tiny_llama: Path, runtime) -> Any:
    return setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)[0]


def _tokens(seed: int, b: int = 2, s: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _calibrate(model: Any) -> None:
    """Two random-token batches: enough for max calibration of per-tensor scales."""
    with torch.no_grad():
        for seed in (10, 11):
            stage_forward(model, _tokens(seed), None)


def _core_attentions(model: Any) -> list:
    return [layer.self_attention.core_attention for layer in model.decoder.layers]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return stage_forward(model, ids, None)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def fp8_model(tiny_llama, runtime) -> Any:
    return mtq.quantize(_build(tiny_llama, runtime), FP8_W_A_KV_CFG, _calibrate)


def test_fp8_kv_quantizers_calibrated_on_every_layer(fp8_model) -> None:
    cores = _core_attentions(fp8_model)
    assert len(cores) == fp8_model.config.num_layers
    for core in cores:
        assert isinstance(core, QuantSDPAttention)
        assert not core.q_bmm_quantizer.is_enabled  # FP8_KV_CFG quantizes K and V only
        for tq in (core.k_bmm_quantizer, core.v_bmm_quantizer):
            assert tq.is_enabled and tq.num_bits == (4, 3)
            assert tq._amax.numel() == 1 and 0 < tq._amax.item() < float("inf")


def test_kv_amax_is_max_of_key_value_and_logits_change(tiny_llama, runtime) -> None:
    """The quantizers see post-RoPE K/V (amax = max |K|, max |V| over the calibration data) and
    run in forward: with only the KV cache quantized, the logits move by a small amount."""
    model = _build(tiny_llama, runtime)
    seen: dict[int, list[float]] = {}

    def record(i: int) -> Callable:
        def hook(_mod, args):
            k, v = args[1].abs().max().item(), args[2].abs().max().item()
            old = seen.get(i, [0.0, 0.0])
            seen[i] = [max(old[0], k), max(old[1], v)]
        return hook

    handles = [c.register_forward_pre_hook(record(i)) for i, c in enumerate(_core_attentions(model))]
    _calibrate(model)
    for h in handles:
        h.remove()
    ids = _tokens(99, s=24)
    ref = _logits(model, ids)

    model = mtq.quantize(model, FP8_KV_ONLY_CFG, _calibrate)
    for i, core in enumerate(_core_attentions(model)):
        amax = [core.k_bmm_quantizer._amax.item(), core.v_bmm_quantizer._amax.item()]
        assert amax == pytest.approx(seen[i], rel=1e-6)
    # Everything else stays unquantized, so the difference is the KV cache's alone.
    assert all(not q.is_enabled for n, q in model.named_modules()
               if isinstance(q, TensorQuantizer) and "_bmm_" not in n)
    out = _logits(model, ids)
    err = _rel_err(out, ref)  # measured 0.044 (max abs 0.18, |logits| <= 3.3), 94% same argmax
    assert 1e-3 < err < 0.1
    assert out.argmax(-1).eq(ref.argmax(-1)).float().mean() > 0.8


def test_quantized_kv_cache_decode_matches_uncached(fp8_model) -> None:
    """The cached decode path goes through the same quantizers as one full forward."""
    ids = _tokens(5, b=1, s=12)
    full = _logits(fp8_model, ids)
    ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=16)
    ctx.materialize_only_last_token_logits = False
    pieces = []
    with torch.no_grad():
        for start, size in ((0, 8), (8, 1), (9, 3)):
            pieces.append(stage_forward(fp8_model, ids[:, start:start + size], ctx))
            ctx.increment_sequence_len_offset(size)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() < 1e-4


def test_quantizer_state_in_sharded_state_dict(fp8_model) -> None:
    ssd = fp8_model.sharded_state_dict()
    for i in range(fp8_model.config.num_layers):
        prefix = f"decoder.layers.{i}.self_attention.core_attention."
        for name in ("k_bmm_quantizer._amax", "v_bmm_quantizer._amax"):
            assert ssd[prefix + name].data.numel() == 1
        extra = ssd[prefix + "_extra_state"]
        state = safe_load(extra.data.numpy().tobytes())  # how ModelOpt's set_extra_state decodes it
        quantizers = state["modelopt_quantizer_state"]
        assert set(quantizers) == {"q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer"}
        assert quantizers["k_bmm_quantizer"]["_num_bits"] == (4, 3)
        assert not quantizers["k_bmm_quantizer"]["_disabled"]
        assert quantizers["q_bmm_quantizer"]["_disabled"]


def test_modelopt_state_and_extra_state_round_trip(fp8_model, tiny_llama, runtime) -> None:
    """In memory: modelopt_state rebuilds the QuantModules, ``_extra_state`` the quantizers'
    settings and buffer shapes, and the ``*_amax`` entries carry the values."""
    sd = fp8_model.state_dict()
    fresh = mto.restore_from_modelopt_state(_build(tiny_llama, runtime), mto.modelopt_state(fp8_model))
    fresh.load_state_dict({k: v for k, v in sd.items() if k.endswith("_extra_state")}, strict=False)
    for core in _core_attentions(fresh):
        assert isinstance(core, QuantSDPAttention) and core.k_bmm_quantizer.is_enabled
        assert core.k_bmm_quantizer._amax.shape == torch.Size([])
    fresh.load_state_dict({k: v for k, v in sd.items() if k.endswith("_amax")}, strict=False)
    for new, old in zip(_core_attentions(fresh), _core_attentions(fp8_model)):
        assert torch.equal(new.k_bmm_quantizer._amax, old.k_bmm_quantizer._amax)
        assert torch.equal(new.v_bmm_quantizer._amax, old.v_bmm_quantizer._amax)
    ids = _tokens(7, s=16)
    assert torch.equal(_logits(fresh, ids), _logits(fp8_model, ids))


def test_dist_checkpoint_round_trip(fp8_model, tiny_llama, runtime, tmp_path) -> None:
    """Megatron dist checkpoint + ModelOpt's sharded modelopt_state, restored the way Megatron-LM
    does it: the per-module quantizer state travels only in ``_extra_state``."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    dist_checkpointing.save(fp8_model.sharded_state_dict(), str(ckpt))
    save_sharded_modelopt_state([fp8_model], str(ckpt))

    holder = [_build(tiny_llama, runtime)]
    restore_sharded_modelopt_state(holder, str(ckpt))
    fresh = holder[0]
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(ckpt)))
    for new, old in zip(_core_attentions(fresh), _core_attentions(fp8_model)):
        assert torch.equal(new.k_bmm_quantizer._amax, old.k_bmm_quantizer._amax)
        assert torch.equal(new.v_bmm_quantizer._amax, old.v_bmm_quantizer._amax)
        assert not new.q_bmm_quantizer.is_enabled
    ids = _tokens(8, s=16)
    assert torch.equal(_logits(fresh, ids), _logits(fp8_model, ids))
