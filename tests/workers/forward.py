"""Worker: full-sequence logits and greedy tokens of a model at a given TP/PP; with
``--kv-cache``, also the KV cache in both key formats (one launch checks several things, each
launch costs ~15 s; tests/test_kv_cache.py asserts on them).

Run under torchrun. The rank holding the last stage with TP rank 0 writes the result.
"""
import argparse

import torch
from megatron.core import parallel_state as ps

from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.data import render_prompt
from post_training.generate import generate
from post_training.inference import stage_forward
from post_training.config import GenerateConfig
from post_training.config import ModelConfig
from post_training.inference import KVCache
from post_training.runtime import ParallelConfig, destroy_runtime, fastpath, init_runtime


def kv_run(model, ids: torch.Tensor, draft: torch.Tensor, prefix: int, keys_rotated: bool) -> dict:
    """Prefix, then a chunk with all logits; and prefix, a rejected draft chunk, truncate, the
    chunk again (speculative decoding's verify-and-roll-back); then one decode step."""
    k = ids.size(1) - prefix
    cache = KVCache(1, ids.size(1) + k, keys_rotated=keys_rotated)
    cache.forward(model, ids[:, :prefix], all_logits=True)
    chunk = cache.forward(model, ids[:, prefix:], all_logits=True)
    cache.truncate(prefix)
    cache.forward(model, draft, all_logits=True)  # rejected: rolled back below
    cache.truncate(prefix)
    again = cache.forward(model, ids[:, prefix:], all_logits=True)
    step = cache.forward(model, ids[:, -1:])  # last-token logits only
    return {"chunk": chunk, "again": again, "step": step, "length": cache.length}


def kv_checks(model) -> dict:
    """Keys rotated (fast paths on, inference mode: the lean layer) and keys unrotated (fast
    paths removed: megatron's path) on the same tokens, with the uncached references."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 49152, (1, 14), generator=g)
    draft = torch.randint(0, 49152, (1, 4), generator=g)
    with torch.inference_mode():
        full = stage_forward(model, ids, None)
        step_ref = stage_forward(model, torch.cat([ids, ids[:, -1:]], 1), None)
        rotated = kv_run(model, ids, draft, 10, keys_rotated=True)
    fastpath.remove()
    try:
        with torch.inference_mode():
            unrotated = kv_run(model, ids, draft, 10, keys_rotated=False)
    finally:
        fastpath.apply()
    last = step_ref[:, -1:] if step_ref is not None else None
    return {"full": full, "step_ref": last, "rotated": rotated, "unrotated": unrotated, "prefix": 10}


def run(hf_dir: str, rt, kv: bool = False, prompt: str = "What is the capital of France?",
        max_new_tokens: int = 16) -> dict | None:
    """Logits and greedy tokens of the chat prompt (and the KV-cache checks), on the rank that
    holds the last stage with TP rank 0; None elsewhere."""
    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir), ModelConfig(), rt)
    ids = render_prompt(prompt, tok)
    with torch.inference_mode():
        logits = stage_forward(model, torch.tensor([ids]), None)
    tokens = generate(model, ids, GenerateConfig(max_new_tokens=max_new_tokens))
    kv_res = kv_checks(model) if kv else None
    if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
        return {"logits": logits, "tokens": tokens, "ids": ids, "kv": kv_res}
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--kv-cache", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompt", default="What is the capital of France?")
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    res = run(a.hf_dir, rt, kv=a.kv_cache, prompt=a.prompt, max_new_tokens=a.max_new_tokens)
    if res is not None:
        torch.save(res, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
