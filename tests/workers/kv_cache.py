"""Worker: the KV cache at TP/PP under torchrun, in both key formats. One launch checks several
things (each launch costs ~15 s); tests/test_kv_cache.py asserts on what it writes.

For keys rotated (fast paths on, inference mode: the lean layer) and keys unrotated (fast paths
removed: megatron's path), from the same prompt: the uncached forward's logits, a k-token
chunk's logits after a cached prefix, and the logits of a chunk appended after rolling back a
rejected one. The rank holding the last stage with TP rank 0 writes the result.
"""
import argparse

import torch
from megatron.core import parallel_state as ps

from post_training.config import ModelConfig, SourceConfig
from post_training.inference import KVCache, stage_forward
from post_training.model_builder import setup_model
from post_training.runtime import ParallelConfig, destroy_runtime, fastpath, init_runtime

VOCAB = 49152


def run(model, ids: torch.Tensor, draft: torch.Tensor, prefix: int, keys_rotated: bool) -> dict:
    """Prefix, then a chunk with all logits; and prefix, a rejected draft chunk, truncate,
    the chunk again (speculative decoding's verify-and-roll-back)."""
    k = ids.size(1) - prefix
    cache = KVCache(1, ids.size(1) + k, keys_rotated=keys_rotated)
    cache.forward(model, ids[:, :prefix], all_logits=True)
    chunk = cache.forward(model, ids[:, prefix:], all_logits=True)
    cache.truncate(prefix)
    cache.forward(model, draft, all_logits=True)  # rejected: rolled back below
    cache.truncate(prefix)
    again = cache.forward(model, ids[:, prefix:], all_logits=True)
    step = cache.forward(model, ids[:, -1:])  # one decode step on top, last-token logits only
    return {"chunk": chunk, "again": again, "step": step, "length": cache.length}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=a.hf_dir), ModelConfig(), rt)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (1, 14), generator=g)
    draft = torch.randint(0, VOCAB, (1, 4), generator=g)
    with torch.inference_mode():
        full = stage_forward(model, ids, None)
        step_ref = stage_forward(model, torch.cat([ids, ids[:, -1:]], 1), None)
        rotated = run(model, ids, draft, 10, keys_rotated=True)
    fastpath.remove()
    try:
        with torch.inference_mode():
            unrotated = run(model, ids, draft, 10, keys_rotated=False)
    finally:
        fastpath.apply()
    if rt.is_last_stage and ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"full": full, "step_ref": step_ref[:, -1:], "rotated": rotated,
                    "unrotated": unrotated, "prefix": 10}, a.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
