"""The KV cache: megatron-core's static inference context, with a declared key format.

Which keys a static cache holds used to depend on the process: with the CPU fast paths they
were stored after RoPE, on megatron's own path before it, so a cache filled on one path and
continued on the other was silently wrong. A :class:`KVCache` fixes its format when it is
created (``keys_rotated``) and declares it on the context; every path honours the declaration
(:mod:`post_training.runtime.kv_format`), whichever fast paths are installed and with or without
inference mode.

Speculative decoding appends k draft tokens in one forward and needs logits for all of them
(``forward(..., all_logits=True)``; megatron's static context materializes only the last
token's logits by default), then rolls rejected positions back (``truncate``): later appends
overwrite them, and attention never reads past the cache's length.
"""
from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from post_training.inference.stage import stage_forward
from post_training.runtime import kv_format, patches

_FORMAT_PATCH = "kv_cache_rotated_keys"


def default_keys_rotated() -> bool:
    """Rotated keys on a CPU runtime (they save re-rotating the whole cache in every layer at
    every step, and the lean CPU layer needs them); megatron's own unrotated format elsewhere,
    where the GPU attention paths (flash decode, fused RoPE, TE) have not been measured with
    the other format."""
    from post_training.runtime import get_runtime

    try:
        cpu = get_runtime().is_cpu
    except RuntimeError:  # no runtime: library use, decided by the machine
        cpu = not torch.cuda.is_available()
    return cpu and patches.is_applied(_FORMAT_PATCH)


class KVCache:
    """A static KV cache for ``max_batch_size`` sequences of up to ``max_sequence_length``
    tokens, on this rank (its TP heads, its PP stage's layers).

    ``keys_rotated`` (fixed at creation; default :func:`default_keys_rotated`): True = keys are
    cached after RoPE, each position rotated once when it is appended (the CPU fast path);
    False = megatron's format, keys before RoPE, the whole cache rotated again in every layer at
    every step. Both give the uncached forward's logits; they differ in speed only. Buffers are
    allocated by the first forward, on the model's device and dtype.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int,
                 keys_rotated: bool | None = None) -> None:
        if keys_rotated is None:
            keys_rotated = default_keys_rotated()
        if keys_rotated and not patches.is_applied(_FORMAT_PATCH):
            raise RuntimeError(f"a KV cache with rotated keys needs the runtime's {_FORMAT_PATCH} "
                               "patch (init_runtime applies it)")
        self.keys_rotated = bool(keys_rotated)
        self.context = StaticInferenceContext(max_batch_size, max_sequence_length)
        kv_format.declare(self.context, self.keys_rotated)

    @property
    def length(self) -> int:
        """Positions filled: the next append starts here."""
        return self.context.sequence_len_offset

    @property
    def capacity(self) -> int:
        return self.context.max_sequence_length

    def forward(self, model, tokens: torch.Tensor, all_logits: bool = False,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Append ``tokens`` [b, k] at positions ``length .. length + k - 1``: run this rank's
        stage forward against the cache and advance it. Returns logits on the last pipeline
        stage ([b, k, V] with ``all_logits``, else [b, 1, V] for the last position), None on
        the others. ``attention_mask`` [b, 1, k, length + k] (True = masked out) replaces the
        causal mask, ``position_ids`` [b, k] the cache positions (see :func:`stage_forward`):
        a left-padded batch (:mod:`post_training.inference.batched`)."""
        k = tokens.size(1)
        if self.length + k > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions: {self.length} + {k} do not fit")
        if self.keys_rotated and model.config.flash_decode:
            raise ValueError("flash decode rotates keys itself: use KVCache(keys_rotated=False)")
        self.context.materialize_only_last_token_logits = not all_logits
        logits = stage_forward(model, tokens, self.context, attention_mask, position_ids)
        self.context.increment_sequence_len_offset(k)
        return logits

    def truncate(self, n: int) -> None:
        """Roll back to the first ``n`` positions (rejected draft tokens): attention reads only
        positions below the length, and the next append overwrites from ``n`` on."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {n}")
        self.context.sequence_len_offset = n

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the sequences ``rows`` (in that order) as rows 0..len(rows)-1, e.g. when
        others finished: later forwards take ``len(rows)`` sequences. Copies the filled
        positions of this rank's layers."""
        if len(rows) == 0 or sorted(set(rows)) != sorted(rows) or max(rows) >= self.context.max_batch_size:
            raise ValueError(f"keep_rows needs distinct rows below {self.context.max_batch_size}, got {rows}")
        n, idx = self.length, None
        for key, value in self.context.key_value_memory_dict.values():
            if idx is None:
                idx = torch.tensor(rows, device=key.device)
            for mem in (key, value):
                mem[:n, :len(rows)] = mem[:n].index_select(1, idx)

    def __repr__(self) -> str:
        return (f"KVCache(length={self.length}, capacity={self.capacity}, "
                f"keys_rotated={self.keys_rotated})")
