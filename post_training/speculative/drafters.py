"""Drafters: who proposes the tokens the target verifies (:func:`speculative_generate`).

One small protocol (:class:`Drafter`) so prompt lookup, a smaller model of the same tokenizer and,
later, trained EAGLE / Medusa heads plug into the same verify loop. Every rank of a model-parallel
group calls the drafter with the same context and must get the same proposal: the n-gram drafter
is deterministic; the model drafter runs its own model at the target's TP/PP, every rank in step,
and its greedy token comes from the last stage by the same broadcast generation uses.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from post_training.config import DraftConfig
from post_training.utils import UsageError

__all__ = ["Drafter", "NgramDrafter", "ModelDrafter", "build_drafter", "check_same_tokenizer"]


@runtime_checkable
class Drafter(Protocol):
    """Proposes draft tokens for the target to verify.

    A drafter that *samples* its proposals may set ``draft_probs`` (a float tensor [n, V]: the
    distribution each of its last n proposals was drawn from) so sampled verification uses the
    true q; a deterministic drafter (n-gram, greedy model) leaves it None and q is one-hot.
    """

    def reset(self, prompt_ids: list[int]) -> None:
        """A new sequence starts with ``prompt_ids``."""

    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``context`` (every token so far); may be empty."""

    def accept(self, n_accepted: int, context: list[int]) -> None:
        """The target kept the first ``n_accepted`` proposals; ``context`` is the sequence now
        (accepted tokens and the target's own next token included). Roll back own state."""


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last ``n`` tokens
    (falling back to ``n-1`` .. ``min_n``) and propose the tokens that followed it."""

    draft_probs = None

    def __init__(self, ngram_size: int = 3, min_ngram_size: int = 1) -> None:
        if not 1 <= min_ngram_size <= ngram_size:
            raise ValueError(f"need 1 <= min_ngram_size <= ngram_size (got {min_ngram_size}, {ngram_size})")
        self.n, self.min_n = ngram_size, min_ngram_size

    def reset(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, context: list[int], k: int) -> list[int]:
        L = len(context)
        if k <= 0:
            return []
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            suffix = context[L - n:]
            first = suffix[0]
            # Latest match first: recent text predicts the continuation better than the prompt's
            # start. The match must end before the suffix itself so something follows it.
            for start in range(L - n - 1, -1, -1):
                if context[start] == first and context[start:start + n] == suffix:
                    return context[start + n:start + n + k]
        return []

    def accept(self, n_accepted: int, context: list[int]) -> None:
        pass

    def __repr__(self) -> str:
        return f"NgramDrafter(n={self.n}..{self.min_n})"


class ModelDrafter:
    """A smaller causal LM of the same tokenizer (a toolkit megatron model, eval mode), greedy,
    with its own KV cache. It keeps the tokens its cache holds and, at each proposal, rolls the
    cache back to the longest prefix shared with the new context (rejected drafts go), then
    feeds the rest in one chunk and drafts token by token."""

    draft_probs = None

    def __init__(self, model, headroom: int = 256) -> None:
        self.model = model
        self.headroom = headroom
        self.cache = None
        self.cached: list[int] = []  # tokens whose keys / values the cache holds, in order
        self.device = next(model.parameters()).device

    def reset(self, prompt_ids: list[int]) -> None:
        self._new_cache(len(prompt_ids) + self.headroom)

    def _new_cache(self, capacity: int) -> None:
        from post_training.inference import KVCache

        limit = getattr(self.model, "max_sequence_length", None)
        if limit:
            capacity = min(capacity, limit)
        self.cache = KVCache(max_batch_size=1, max_sequence_length=capacity)
        self.cached = []

    def _step(self, tokens: list[int]) -> int:
        """Append ``tokens`` to the cache; the greedy next token (the same on every rank)."""
        from post_training.runtime.collectives import broadcast_from_last_stage

        logits = self.cache.forward(self.model, torch.tensor([tokens], dtype=torch.long, device=self.device))
        self.cached.extend(tokens)
        nxt = torch.empty(1, dtype=torch.long, device=self.device)
        if logits is not None:
            nxt = logits[:, -1, :].argmax(dim=-1)
        return int(broadcast_from_last_stage(nxt).item())

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or not context:
            return []
        from post_training.runtime import cpu_compat

        if self.cache is None or len(context) + k > self.cache.capacity:
            if len(context) + k > getattr(self.model, "max_sequence_length", 1 << 62):
                return []  # beyond the draft's positions: let the target go alone
            self._new_cache(len(context) + k + self.headroom)
        common = 0
        for a, b in zip(self.cached, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # feed at least one token to get logits
        self.cache.truncate(common)
        del self.cached[common:]
        out: list[int] = []
        with cpu_compat.device_mode_suspended():
            nxt = self._step(context[common:])
            out.append(nxt)
            while len(out) < k:
                nxt = self._step([nxt])
                out.append(nxt)
        return out

    def accept(self, n_accepted: int, context: list[int]) -> None:
        # The rollback happens lazily at the next proposal (shared-prefix match), which also
        # covers a caller that never calls accept.
        pass

    def __repr__(self) -> str:
        return f"ModelDrafter({type(self.model).__name__}, cached={len(self.cached)})"


def check_same_tokenizer(draft_tok, target_tok, draft_vocab: int | None = None,
                         target_vocab: int | None = None) -> None:
    """A draft model proposes token ids: its tokenizer must map them to the same text."""
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise UsageError(
            f"the draft model's tokenizer differs from the target's ({len(draft_tok)} vs "
            f"{len(target_tok)} tokens): a draft model must share the target's tokenizer")
    if draft_vocab is not None and target_vocab is not None and draft_vocab != target_vocab:
        raise UsageError(f"the draft model's vocabulary ({draft_vocab}) differs from the target's "
                         f"({target_vocab}): a draft model must share the target's vocabulary")


def build_drafter(cfg: DraftConfig, target_tokenizer, target_hf_config: Any = None, rt=None,
                  mcfg=None) -> Drafter | None:
    """The drafter ``cfg`` names (None for ``--draft none``). The model drafter is built at the
    runtime's TP/PP (``rt``) with the target's model settings (``mcfg``: dtype, seq length)."""
    if cfg.draft == "none":
        return None
    if cfg.draft == "ngram":
        return NgramDrafter(cfg.ngram_size)
    if cfg.draft in ("eagle", "medusa"):
        raise UsageError(f"--draft {cfg.draft} needs a trained draft head (scripts/eagle3.sh); "
                         "use --draft ngram or --draft model for now")
    # --draft model: check the tokenizer before building anything.
    from post_training import hf
    from post_training.config import SourceConfig

    src = SourceConfig(pretrained_model_path=cfg.draft_model_path, load=cfg.draft_load)
    hf_dir = Path(hf.source_hf_dir(src))
    from transformers import AutoConfig

    draft_hf = AutoConfig.from_pretrained(hf_dir)
    check_same_tokenizer(hf.load_tokenizer(hf_dir), target_tokenizer, draft_hf.vocab_size,
                         getattr(target_hf_config, "vocab_size", None))
    if rt is None or mcfg is None:
        raise ValueError("--draft model needs the runtime and the model config to build the draft")
    hf.check_parallel(draft_hf, rt.tp, rt.pp)
    from post_training.model_builder import setup_model

    model, _, _ = setup_model(src, mcfg, rt, hf_dir=hf_dir)
    return ModelDrafter(model)
