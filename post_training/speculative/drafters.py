"""Drafters: who proposes the tokens the target verifies (:func:`speculative_generate`).

One small protocol (:class:`Drafter`) so prompt lookup, a smaller model of the same tokenizer and,
later, trained EAGLE / Medusa heads plug into the same verify loop. Every rank of a model-parallel
group calls the drafter with the same context and must get the same proposal: the n-gram drafter
is deterministic; the model drafter runs its own model at the target's TP/PP, every rank in step,
and its greedy token comes from the last stage by the same broadcast generation uses.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import torch

from post_training.config import DraftConfig
from post_training.utils import UsageError

__all__ = ["Drafter", "NgramDrafter", "ModelDrafter", "build_drafter", "check_draft", "check_same_tokenizer"]


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

    def __init__(self, ngram_size: int = 3, min_ngram_size: int = 1, weak_match_tokens: int = 1) -> None:
        if not 1 <= min_ngram_size <= ngram_size:
            raise ValueError(f"need 1 <= min_ngram_size <= ngram_size (got {min_ngram_size}, {ngram_size})")
        if weak_match_tokens < 1:
            raise ValueError(f"weak_match_tokens must be >= 1 (got {weak_match_tokens})")
        # A match on the last token alone is weak evidence: on the offline prompt set its
        # proposals beyond the first token are mostly rejected, and each costs verify time.
        # Replaying SmolLM2's greedy answers to the 40 first turns (benchmarks/RESULTS.md), K = 3:
        # one token after a 1-token match gave AL 1.32 verifying 1.87 tokens per step, K tokens
        # gave AL 1.37 verifying 2.58: fewer tokens per verify, the better predicted speed-up.
        self.n, self.min_n, self.weak = ngram_size, min_ngram_size, weak_match_tokens

    def reset(self, prompt_ids: list[int]) -> None:
        pass

    def propose(self, context: list[int], k: int) -> list[int]:
        L = len(context)
        if k <= 0:
            return []
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            want = k if n > 1 else min(k, self.weak)
            suffix = context[L - n:]
            first = suffix[0]
            # Latest match first (recent text predicts the continuation better than the prompt's
            # start), but one followed by k tokens: in a repetition ("a a a a") the latest match
            # ends right before the suffix and would propose a single token.
            best: list[int] = []
            for start in range(L - n - 1, -1, -1):
                if context[start] == first and context[start:start + n] == suffix:
                    follow = context[start + n:start + n + want]
                    if len(follow) == want:
                        return follow
                    if len(follow) > len(best):
                        best = follow
            if best:
                return best
        return []

    def accept(self, n_accepted: int, context: list[int]) -> None:
        pass

    def __repr__(self) -> str:
        return f"NgramDrafter(n={self.n}..{self.min_n}, weak match: {self.weak} tokens)"


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
        # Runs inside speculative_generate's device-mode suspension (the mode is not re-entrant).
        out = [self._step(context[common:])]
        while len(out) < k:
            out.append(self._step([out[-1]]))
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


def check_draft(cfg: DraftConfig, target_tok, target_hf_config: Any, tp: int = 1, pp: int = 1,
                load: str | None = None) -> None:
    """What can be refused before any model loads (``--preflight`` runs it): a head that is not
    there or was made for another target, a draft model of another tokenizer or vocabulary, or
    one the runtime's TP/PP cannot split (the draft runs at the target's layout). ``load``: the
    target's ``--load`` (a checkpoint trained by scripts/eagle3.sh carries its head)."""
    if cfg.draft in ("eagle", "medusa"):
        _check_head(cfg, target_hf_config, load)
        return
    if cfg.draft != "model":
        return
    from post_training import hf

    draft_dir = draft_hf_dir(cfg)
    draft_hf = json.loads((draft_dir / "config.json").read_text())
    target_vocab = (target_hf_config.get("vocab_size") if isinstance(target_hf_config, dict)
                    else getattr(target_hf_config, "vocab_size", None))
    check_same_tokenizer(hf.load_tokenizer(draft_dir), target_tok, draft_hf.get("vocab_size"), target_vocab)
    try:
        hf.check_parallel(SimpleNamespace(**draft_hf), tp, pp)
    except UsageError as e:
        raise UsageError(f"draft model: {e} (it runs at the target's TP/PP)") from None


def _target_field(target_hf_config: Any, name: str):
    return (target_hf_config.get(name) if isinstance(target_hf_config, dict)
            else getattr(target_hf_config, name, None))


def checkpoint_head_mode(load: str | None) -> str | None:
    """'eagle' / 'medusa' when ``load`` is a dist checkpoint saved with that ModelOpt mode."""
    from post_training import hf
    from post_training.io import layout

    if not load or hf.load_kind(load) != "dist":
        return None
    modes = layout.read_meta(layout.find_checkpoint(load)).get("modelopt_modes") or []
    return next((m for m in modes if m in ("eagle", "medusa")), None)


def _check_head(cfg: DraftConfig, target_hf_config: Any, load: str | None = None):
    """The head for ``--draft eagle|medusa``: an exported head directory made for this target,
    or the one the target's ``--load`` checkpoint carries."""
    from post_training.speculative.head_layout import check_head_for_target, read_head_config

    if not cfg.draft_model_path:
        mode = checkpoint_head_mode(load)
        if mode == cfg.draft:
            return None
        if mode is not None:
            raise UsageError(f"--draft {cfg.draft}: the --load checkpoint's head is {mode}, not {cfg.draft}")
        raise UsageError(f"--draft {cfg.draft} needs a trained draft head: --draft-model-path DIR (an "
                         "exported head, config.json + model.safetensors; scripts/export.sh writes "
                         "<EXPORT_DIR>/eagle3_draft) or --load a checkpoint trained by scripts/eagle3.sh")
    hc = read_head_config(cfg.draft_model_path)
    if (hc.kind == "medusa") != (cfg.draft == "medusa"):
        raise UsageError(f"--draft {cfg.draft}: {cfg.draft_model_path} holds a {hc.kind} head")
    if target_hf_config is not None:
        check_head_for_target(hc, _target_field(target_hf_config, "hidden_size"),
                              _target_field(target_hf_config, "vocab_size"),
                              _target_field(target_hf_config, "num_hidden_layers"),
                              where=f"draft head {cfg.draft_model_path}")
    return hc


def draft_hf_dir(cfg: DraftConfig) -> Path:
    """The draft's HF directory (config + tokenizer): --draft-model-path, or the HF files a
    --draft-load checkpoint carries (or that directory itself when it is an HF model)."""
    from post_training import hf

    return Path(hf.source_hf_dir(_draft_source(cfg)))


def _draft_source(cfg: DraftConfig):
    from post_training.config import SourceConfig

    return SourceConfig(pretrained_model_path=cfg.draft_model_path, load=cfg.draft_load)


def build_drafter(cfg: DraftConfig, target_tokenizer, target_hf_config: Any = None, rt=None,
                  mcfg=None, target=None, load: str | None = None) -> Drafter | None:
    """The drafter ``cfg`` names (None for ``--draft none``). The model drafter is built at the
    runtime's TP/PP (``rt``, every rank holds its shard and runs every draft step) with the
    target's model settings (``mcfg``: dtype, seq length). A head (eagle, medusa) reads the
    ``target`` model's embedding (and output layer when it has no lm_head of its own); without
    --draft-model-path it is the head the target's ``load`` checkpoint carries."""
    if cfg.draft == "none":
        return None
    check_draft(cfg, target_tokenizer, target_hf_config, *((rt.tp, rt.pp) if rt is not None else (1, 1)),
                load=load)
    if cfg.draft == "ngram":
        return NgramDrafter(cfg.ngram_size)
    if cfg.draft in ("eagle", "medusa"):
        from post_training.speculative.eagle_draft import load_draft_head
        from post_training.speculative.head_drafter import head_drafter, head_of_target

        if target is None:
            raise ValueError(f"--draft {cfg.draft} needs the target model to build the drafter")
        head = load_draft_head(cfg.draft_model_path) if cfg.draft_model_path else head_of_target(target)
        return head_drafter(head, target)
    if rt is None or mcfg is None:
        raise ValueError("--draft model needs the runtime and the model config to build the draft")
    from post_training.model_builder import setup_model

    model, _, _ = setup_model(_draft_source(cfg), mcfg, rt, hf_dir=draft_hf_dir(cfg))
    return ModelDrafter(model)
