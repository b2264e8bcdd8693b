"""Drafters of trained heads (EAGLE-3, EAGLE-1, Medusa) on the target's hidden states.

They declare ``hidden_spec`` (:class:`~post_training.inference.hidden.HiddenSpec`): which target
hidden states they need. :func:`~post_training.speculative.decode.speculative_generate` then
captures them in every target forward (prefill and verify) and hands them over with
``feed_hidden(rows, start)`` (rows of target positions ``start ..``). Rows of rejected drafts are
handed over too; a drafter only reads rows of positions below ``len(context) - 1``, which are
final, and later forwards overwrite the others.

Every rank runs the head (fp32, full weights on every rank) on the same hidden states (the same on
every rank, see :mod:`post_training.inference.hidden`), so every rank proposes the same tokens
without a broadcast. The target's token embedding (and, for a head without its own ``lm_head``,
the target's output layer) is copied once, gathered over TP and sent from the stage that holds it.
"""
from __future__ import annotations

import torch

from post_training.inference.hidden import HiddenSpec
from post_training.speculative.eagle_draft import EagleDraft, MedusaDraft

__all__ = ["EagleDrafter", "MedusaDrafter", "target_embedding", "target_output_weight", "head_drafter",
           "head_of_target", "use_plain_forward"]


def target_embedding(model) -> torch.Tensor:
    """The target's full word-embedding table (fp32) on every rank."""
    from post_training.runtime.collectives import broadcast_from_first_stage, tp_all_gather

    if model.pre_process:
        w = tp_all_gather(model.embedding.word_embeddings.weight.detach(), 0)
        shape = torch.tensor(w.shape)
    else:
        w, shape = None, torch.zeros(2, dtype=torch.long)
    shape = broadcast_from_first_stage(shape.to(next(model.parameters()).device))
    if w is None:
        w = torch.empty(*shape.tolist(), dtype=model.config.params_dtype, device=shape.device)
    return broadcast_from_first_stage(w.contiguous()).float().cpu()


def target_output_weight(model, embedding: torch.Tensor) -> torch.Tensor:
    """The target's full output-layer weight (fp32) on every rank; the embedding when tied."""
    from post_training.runtime.collectives import broadcast_from_last_stage, tp_all_gather

    if model.share_embeddings_and_output_weights:
        return embedding
    dev = next(model.parameters()).device
    w = (tp_all_gather(model.output_layer.weight.detach(), 0).contiguous() if model.post_process
         else torch.empty(*embedding.shape, dtype=model.config.params_dtype, device=dev))
    return broadcast_from_last_stage(w).float().cpu()


class _HiddenRows:
    """Target hidden rows by position (grown on demand)."""

    def __init__(self, width: int) -> None:
        self.buf = torch.zeros(0, width)

    def put(self, rows: torch.Tensor, start: int) -> None:
        end = start + rows.shape[0]
        if end > self.buf.shape[0]:
            grown = torch.zeros(max(end, 2 * self.buf.shape[0], 256), self.buf.shape[1])
            grown[:self.buf.shape[0]] = self.buf
            self.buf = grown
        self.buf[start:end] = rows.float()


class EagleDrafter:
    """EAGLE-3 / EAGLE-1 head, greedy chain of up to K tokens per target step. Its KV cache holds
    entries from the target's real hiddens (``n_real``; entry i = hidden i + token i+1), then the
    chain's own entries, which are truncated before the next proposal."""

    draft_probs = None

    def __init__(self, head: EagleDraft, embedding: torch.Tensor, output_weight: torch.Tensor | None = None) -> None:
        self.head = head
        if head.lm_head is None:
            if output_weight is None:
                raise ValueError("a head without lm_head needs the target's output layer")
            head.lm_head = output_weight[:head.cfg.draft_vocab_size].float().contiguous()
        self.embedding = embedding
        c = head.cfg
        self.hidden_spec = (HiddenSpec(layers=tuple(sorted(c.aux_layer_ids))) if c.kind == "eagle3"
                            else HiddenSpec(final=True))
        self.reset([])

    def reset(self, prompt_ids: list[int]) -> None:
        self.rows = _HiddenRows(self.head.aux_width)
        self.have = 0  # target rows fed (positions 0 .. have - 1 may be read once final)
        self.n_real = 0
        self.head.truncate(0)

    def feed_hidden(self, rows: torch.Tensor, start: int) -> None:
        self.rows.put(rows.reshape(rows.shape[0], -1), start)
        self.have = max(self.have, start + rows.shape[0])

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> list[int]:
        need = len(context) - 1  # entries 0 .. need-1: hidden i (final) + token i + 1
        if k <= 0 or need <= 0 or need > self.have:
            return []
        # Recompute at least the last real entry: its logits start the chain.
        start = min(self.n_real, need - 1)
        self.head.truncate(start)
        toks = torch.tensor(context[start + 1:need + 1])
        x = self.head.project(self.rows.buf[start:need])
        logits, nxt = self.head.append(self.embedding[toks], x)
        self.n_real = need
        out: list[int] = []
        while True:
            tok = int(self.head.to_target(logits[-1].argmax()))
            out.append(tok)
            if len(out) == k or self.head.length >= self.head.cfg.max_position_embeddings:
                return out
            logits, nxt = self.head.append(self.embedding[tok].unsqueeze(0), nxt[-1:])

    def accept(self, n_accepted: int, context: list[int]) -> None:
        # The chain's entries go at the next proposal (truncate to n_real): they were computed
        # from the draft's own hiddens, which the target's real ones replace.
        self.head.truncate(self.n_real)

    def __repr__(self) -> str:
        return f"EagleDrafter({self.head.cfg.kind}, entries={self.head.length})"


class MedusaDrafter:
    """Medusa heads on the target's final hidden at the last position with a hidden: head i
    proposes the token i + 1 after the pending one (a greedy chain, no tree)."""

    draft_probs = None
    hidden_spec = HiddenSpec(final=True)

    def __init__(self, head: MedusaDraft) -> None:
        self.head = head
        self.reset([])

    def reset(self, prompt_ids: list[int]) -> None:
        self.rows = _HiddenRows(self.head.cfg.hidden_size)
        self.have = 0

    def feed_hidden(self, rows: torch.Tensor, start: int) -> None:
        self.rows.put(rows.reshape(rows.shape[0], -1), start)
        self.have = max(self.have, start + rows.shape[0])

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> list[int]:
        p = len(context) - 2  # the position whose output was the pending (last) token
        if k <= 0 or p < 0 or p >= self.have:
            return []
        return self.head.logits(self.rows.buf[p], k).argmax(-1).tolist()

    def accept(self, n_accepted: int, context: list[int]) -> None:
        pass

    def __repr__(self) -> str:
        return f"MedusaDrafter({self.head.cfg.medusa_heads} heads)"


def head_drafter(head, model) -> EagleDrafter | MedusaDrafter:
    """The drafter of a native head for the target ``model`` (any TP/PP; every rank)."""
    if isinstance(head, MedusaDraft):
        return MedusaDrafter(head)
    emb = target_embedding(model)
    out = target_output_weight(model, emb) if head.lm_head is None else None
    return EagleDrafter(head, emb, out)


def head_of_target(model) -> EagleDraft | MedusaDraft:
    """The trained head a ModelOpt-converted target carries (a ``--load`` of a checkpoint from
    scripts/eagle3.sh), as a native head; the target then runs as the plain GPTModel.

    Collective (TP gather on the last stage, then sent to every stage). The converted model's
    own forward is ModelOpt's training forward (no KV cache, the draft loss), so this instance's
    ``forward`` becomes GPTModel's again and the plugin's aux-state hooks on the decoder layers
    (which keep a copy of every forward's states) are removed: the instance changes, no
    upstream code does, as :mod:`post_training.speculative.heads` does for training."""
    from post_training.runtime.collectives import broadcast_object_from_last_stage
    from post_training.speculative.eagle_draft import build_head
    from post_training.speculative.head_layout import HeadConfig
    from post_training.speculative.head_state import draft_head_state
    from post_training.speculative.heads import draft_kind
    from post_training.utils import UsageError

    if draft_kind(model) is None:
        raise UsageError("the target carries no trained draft head: pass --draft-model-path DIR")
    head = draft_head_state(model) if model.post_process else None
    config, state = broadcast_object_from_last_stage(head)
    use_plain_forward(model)
    return build_head(HeadConfig.from_hf(config), state, where="the --load checkpoint's draft head")


def use_plain_forward(model) -> None:
    """Make a ModelOpt-converted target (EAGLE / Medusa mode restored by a checkpoint load) run
    as the plain GPTModel: its own forward is the training forward, which ignores the KV cache
    (plain generation from such a checkpoint decoded each token without context), and EAGLE's
    aux-state hooks keep a copy of every forward's states. Instance attributes only."""
    from types import MethodType

    from megatron.core.models.gpt import GPTModel

    model.forward = MethodType(GPTModel.forward, model)
    for layer in model.decoder.layers:
        for key, hook in list(layer._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "_transformer_layer_forward_hook":
                del layer._forward_hooks[key]
