"""The runtime layer: CPU shims, device choice and process-group checks."""
import contextlib

import pytest
import torch

from post_training.runtime import ParallelConfig, cpu_compat, memory_report
from post_training.runtime.dist import _resolve_device, init_runtime
from post_training.utils import UsageError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims apply only without CUDA")


def test_shims_rewrite_cuda_device_arguments(runtime):
    assert runtime.cpu_compat and cpu_compat.is_applied()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t and t.to("cuda").device.type == "cpu"
    assert t.to("cuda", torch.float64).dtype == torch.float64
    with cpu_compat.device_mode_suspended():  # decode steps run without the mode
        assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # and it is back afterwards


def test_cuda_queries_answer_on_cpu(runtime):
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    assert 0 < free <= total
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_megatron_rng_tracker_forks_on_cpu(runtime):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # fork restores the default stream
    assert not torch.equal(inside, torch.rand(4))


def test_every_shim_names_its_upstream_site():
    assert cpu_compat.SHIMS and all(s.covers for s in cpu_compat.SHIMS)


def test_cuda_requested_but_absent():
    with pytest.raises(UsageError, match="CUDA was requested"):
        _resolve_device("cuda", 0)


def test_bad_parallel_config():
    with pytest.raises(UsageError):
        ParallelConfig(tp=0)
    with pytest.raises(UsageError):
        ParallelConfig(device="tpu")


def test_world_not_divisible(monkeypatch):
    import post_training.runtime.dist as d

    monkeypatch.setattr(d, "_RUNTIME", None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UsageError, match="not divisible"):
        init_runtime(ParallelConfig(tp=2))


def test_memory_report_mentions_rss():
    assert "rss" in memory_report("x")


def test_fastpath_is_exact_and_leaves_autograd_alone(tiny_llama, runtime):
    """Inference fast paths give the same logits as megatron's own functions, and outside
    inference mode the originals (autograd Functions) still run."""
    from post_training.config import SourceConfig
    from post_training.model_builder import setup_model
    from post_training.inference import stage_forward
    from post_training.config import ModelConfig
    from post_training.runtime import fastpath

    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    ids = torch.randint(0, 49152, (1, 17), generator=torch.Generator().manual_seed(4))
    assert fastpath.is_applied(), "fast paths are installed on CPU"
    with torch.inference_mode():
        fast = stage_forward(model, ids, None)
    with torch.no_grad():  # not inference mode: original megatron path
        slow = stage_forward(model, ids, None)
    fastpath.remove()
    try:
        with torch.inference_mode():
            orig = stage_forward(model, ids, None)
    finally:
        fastpath.apply()
    assert torch.equal(slow, orig)
    assert (fast - orig).abs().max().item() < 1e-5
    model.requires_grad_(True)
    out = stage_forward(model, ids, None)
    out.float().pow(2).mean().backward()
    assert model.decoder.layers[0].mlp.linear_fc1.weight.grad is not None


def _cached_decode_logits(model, prompt: torch.Tensor, steps: int, keys_rotated: bool = True) -> torch.Tensor:
    """Prefill, then ``steps`` greedy decode steps through the KV cache (megatron's static
    context; keys rotated by default, as on CPU)."""
    from post_training.inference import KVCache

    cache = KVCache(max_batch_size=1, max_sequence_length=prompt.size(1) + steps + 1,
                    keys_rotated=keys_rotated)
    tokens, out = prompt, []
    with torch.inference_mode():
        for _ in range(steps + 1):
            logits = cache.forward(model, tokens)[:, -1]
            out.append(logits.clone())
            tokens = logits.argmax(-1, keepdim=True)
    return torch.stack(out)


@contextlib.contextmanager
def _originals(*keys):
    """Megatron's own functions at these patched sites, the other patches kept."""
    from post_training.runtime import patches

    wrappers = {k: getattr(*k) for k in keys}
    for (owner, name) in keys:
        setattr(owner, name, patches.original(owner, name))
    try:
        yield
    finally:
        for (owner, name), w in wrappers.items():
            setattr(owner, name, w)


def _lean_layer_sites():
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return (TransformerLayer, "forward"), (TransformerBlock, "forward")


def test_fastpath_rotated_key_cache_and_mlp_equal_megatron(tiny_llama, runtime):
    """Keys rotated once before caching, and the lean gated MLP, give megatron's decode logits
    at every step exactly (the original re-rotates the whole cache in the same rope formula).
    Checked under megatron's own layer forward, which calls these sites. (The rotated-key
    wrapper is the kv_format patch now, not a fast path; megatron's function is swapped in the
    same way.)"""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.mlp import MLP

    from post_training.config import SourceConfig
    from post_training.model_builder import setup_model
    from post_training.config import ModelConfig
    from post_training.runtime import fastpath

    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    prompt = torch.randint(0, 49152, (1, 11), generator=torch.Generator().manual_seed(5))
    with _originals(*_lean_layer_sites()):
        fast = _cached_decode_logits(model, prompt, 6)
        for site in ((Attention, "_adjust_key_value_for_inference"), (MLP, "forward")):
            with _originals(site):  # each fast path alone against megatron's function
                orig = _cached_decode_logits(model, prompt, 6, keys_rotated=site[0] is not Attention)
            assert torch.equal(fast, orig), site
    fastpath.remove()
    try:
        all_orig = _cached_decode_logits(model, prompt, 6)
    finally:
        fastpath.apply()
    assert (fast - all_orig).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind,hooked", [("llama", False), ("llama", True), ("qwen3", False), ("qwen2", False)])
def test_lean_layer_equals_megatron_layer(tiny_dirs, runtime, monkeypatch, kind, hooked):
    """The lean layer and block loop give the logits of megatron's TransformerLayer /
    TransformerBlock forward bit for bit, at the prefill and every cached decode step (Qwen3:
    q/k norms, separate rotation; Qwen2: qkv bias, untied output layer); the lean path really
    runs; a forward hook on a linear layer is honoured (its module is called)."""
    from post_training.config import SourceConfig
    from post_training.model_builder import setup_model
    from post_training.config import ModelConfig
    from post_training.runtime import fast_layer

    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_dirs[kind])), ModelConfig(), runtime)
    with torch.no_grad():  # HF initialises biases to zero, which would hide a dropped bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
    prompt = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(6))
    plain = _cached_decode_logits(model, prompt, 5)
    if hooked:  # halves one layer's qkv projection: the logits must change the same way
        model.decoder.layers[0].self_attention.linear_qkv.register_forward_hook(
            lambda mod, args, out: (out[0] * 0.5, out[1]))
    lean_calls = []
    real_layer = fast_layer.layer_forward

    def spy(*args, **kwargs):
        out = real_layer(*args, **kwargs)
        lean_calls.append(out is not NotImplemented)
        return out

    monkeypatch.setattr(fast_layer, "layer_forward", spy)  # seen only from the block loop
    fast = _cached_decode_logits(model, prompt, 5)
    assert lean_calls == [True] * len(model.decoder.layers) * 6  # prefill + 5 decode steps
    with _originals(*_lean_layer_sites()):
        orig = _cached_decode_logits(model, prompt, 5)
    assert torch.equal(fast, orig)
    assert hooked != torch.equal(fast, plain)


def test_rope_table_is_computed_on_one_thread_and_threads_restored(runtime):
    """cos/sin of a rotary table above torch's 2048-element split are computed on one thread
    (a threaded MKL vmsCos once returned low-accuracy values for half a table), then the
    thread count is back; the values are torch's own cos/sin."""
    from post_training.runtime import kernels

    cache = kernels.CosSinCache()
    freqs = torch.outer(torch.arange(40.0), torch.rand(64, generator=torch.Generator().manual_seed(0)))
    freqs = freqs[:, None, None, :].contiguous()
    threads = torch.get_num_threads()
    seen = []
    orig_cos = torch.cos

    def spy(t):
        seen.append(torch.get_num_threads())
        return orig_cos(t)

    torch.cos = spy
    try:
        cos, signed_sin = cache.get(freqs, torch.float32)
        cache.get(freqs[:1], torch.float32)  # 64 elements: no thread change needed
    finally:
        torch.cos = orig_cos
    assert seen == [1, threads]
    assert torch.get_num_threads() == threads
    assert torch.equal(cos, torch.cos(freqs))
    assert torch.equal(signed_sin[..., 32:], torch.sin(freqs)[..., 32:])
    assert torch.equal(signed_sin[..., :32], -torch.sin(freqs)[..., :32])


def test_small_row_linear_is_f_linear_up_to_fp32_rounding():
    """kernels.linear: one row (decode) and more than SMALL_ROWS rows (prefill) are F.linear bit
    for bit; 2..SMALL_ROWS rows in fp32 (a speculative verify) take the transposed product,
    equal to F.linear within fp32 rounding; bf16 keeps F.linear at every row count."""
    import torch.nn.functional as F

    from post_training.runtime import kernels

    g = torch.Generator().manual_seed(3)
    big = torch.randn(4096, 576, generator=g) * 0.05
    bias = torch.randn(4096, generator=g)
    with torch.inference_mode():
        for rows in range(1, kernels.SMALL_ROWS + 3):
            x = torch.randn(rows, 1, 576, generator=g)
            ref, out = F.linear(x, big) + bias, kernels.linear(x, big, bias)
            assert out.shape == ref.shape and out.is_contiguous()
            if rows == 1 or rows > kernels.SMALL_ROWS:
                assert torch.equal(out, ref), rows
            else:
                assert torch.equal(out, torch.mm(big, x[:, 0].t()).t()[:, None] + bias), rows
                assert ((out - ref).abs() <= 1e-5 * (1 + ref.abs())).all(), rows
            xb, wb = x.bfloat16(), big.bfloat16()
            assert torch.equal(kernels.linear(xb, wb), F.linear(xb, wb))
