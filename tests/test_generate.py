"""KV-cache generation on a tiny model: greedy equals transformers, sampling behaves."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.generate import generate, sample
from post_training.config import GenerateConfig
from post_training.config import ModelConfig
from post_training.utils import UsageError


@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return model, ref


def test_greedy_equals_transformers(tiny):
    model, ref = tiny
    for seed in range(3):
        prompt = torch.randint(0, 49152, (9 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        ours = generate(model, prompt, GenerateConfig(max_new_tokens=24))
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == theirs


def test_stops_at_stop_token(tiny):
    model, _ = tiny
    prompt = [5, 6, 7, 8]
    free = generate(model, prompt, GenerateConfig(max_new_tokens=12))
    stop = free[4]
    out = generate(model, prompt, GenerateConfig(max_new_tokens=12, stop_token_ids=[stop]))
    assert out == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_varies(tiny):
    model, _ = tiny
    cfg = dict(max_new_tokens=16, temperature=1.5, top_p=0.95)
    a = generate(model, [5, 6, 7], GenerateConfig(**cfg), seed=1)
    b = generate(model, [5, 6, 7], GenerateConfig(**cfg), seed=1)
    c = generate(model, [5, 6, 7], GenerateConfig(**cfg), seed=2)
    assert a == b and a != c


def test_top_k_one_is_greedy(tiny):
    model, _ = tiny
    greedy = generate(model, [9, 10, 11], GenerateConfig(max_new_tokens=10))
    topk1 = generate(model, [9, 10, 11], GenerateConfig(max_new_tokens=10, temperature=0.7, top_k=1))
    assert greedy == topk1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])  # probs ~ .72 .26 .01 .004
    cfg = GenerateConfig(temperature=1.0, top_p=0.9)
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, cfg, g)) for _ in range(300)}
    assert drawn == {0, 1}


def test_too_long_request_is_refused(tiny):
    model, _ = tiny
    with pytest.raises(UsageError, match="exceeds --seq-length"):
        generate(model, list(range(10)), GenerateConfig(max_new_tokens=10), max_seq_length=15)


def test_every_decoder_runs_in_inference_mode(tiny):
    """Plain, batched and speculative decoding record no autograd state: a refactor once moved
    ``@torch.inference_mode()`` off ``generate()`` and plain greedy ran ~1.4x slower than its
    per-step cost (benchmarks/RESULTS.md, the EAGLE-3 recipe)."""
    from post_training.inference.batched import generate_batch
    from post_training.speculative import NgramDrafter, speculative_generate

    model, _ = tiny
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    try:
        cfg = GenerateConfig(max_new_tokens=4)
        generate(model, [5, 6, 7], cfg)
        generate_batch(model, [[5, 6, 7], [8, 9]], cfg)
        speculative_generate(model, [5, 6, 7, 5, 6], NgramDrafter(2), cfg, 2)
    finally:
        handle.remove()
    assert len(seen) >= 3 and all(seen)
