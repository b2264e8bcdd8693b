"""Tiny random Llama / Qwen3 / Qwen2: MCore logits equal transformers', KV cache equals no cache."""
import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from transformers import AutoConfig, AutoModelForCausalLM

from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.inference import stage_forward
from post_training.config import ModelConfig


def _load(hf_dir, runtime):
    model, tok, cfg = setup_model(SourceConfig(pretrained_model_path=str(hf_dir)), ModelConfig(), runtime)
    return model, tok


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2"])
def test_logits_match_transformers(tiny_dirs, runtime, kind):
    model, _ = _load(tiny_dirs[kind], runtime)
    ids = torch.randint(0, 49152, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = stage_forward(model, ids, None)
        ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[kind], dtype=torch.float32)(ids).logits
    assert ours.shape == ref.shape
    assert ref.abs().max() > 0.1  # not a degenerate model
    assert (ours - ref).abs().max().item() < 1e-4


def test_kv_cache_chunks_match_uncached(tiny_llama, runtime):
    """Prefill, single-token decode and multi-token verify chunks against one full forward."""
    model, _ = _load(tiny_llama, runtime)
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = stage_forward(model, ids, None)
        ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=32)
        ctx.materialize_only_last_token_logits = False
        pieces, start = [], 0
        for size in (8, 1, 1, 3, 1, 4, 2):  # 3- and 4-token chunks: the speculative verify case
            pieces.append(stage_forward(model, ids[:, start:start + size], ctx))
            ctx.increment_sequence_len_offset(size)
            start += size
    cached = torch.cat(pieces, dim=1)
    assert start == ids.size(1)
    assert (cached - full).abs().max().item() < 1e-4


def test_rope_and_shape_come_from_hf_config(tiny_dirs, runtime):
    model, _ = _load(tiny_dirs["qwen3"], runtime)
    hf = AutoConfig.from_pretrained(tiny_dirs["qwen3"])
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.kv_channels) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_key_value_heads, hf.head_dim)
    assert cfg.qk_layernorm and model.share_embeddings_and_output_weights
