"""Inference building blocks: one pipeline-stage forward and the KV cache.

:func:`stage_forward` runs this rank's pipeline stage (PP send/recv included); :class:`KVCache`
is the one KV-cache interface (what it stores, append a chunk, roll back) that generation and
speculative decoding use.
"""
from post_training.inference.kv_cache import KVCache, default_keys_rotated
from post_training.inference.stage import stage_forward

__all__ = ["KVCache", "default_keys_rotated", "stage_forward"]
