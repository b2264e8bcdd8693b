"""SFT / chat training data: load conversations (OpenAI ``messages``, ShareGPT ``conversations``,
prompt/response columns), render them with the tokenizer's chat template, mask the loss to the
assistant's tokens, pack them into fixed ``seq_length + 1`` samples and serve them in a
deterministic order tied to the seed and the number of samples already consumed.

Usage (the training loop)::

    train, valid = build_sft_datasets(cfg, tokenizer, seq_length, seed)
    for samples in global_batches(train, global_batch_size, consumed_samples):
        mbs = training.collate(samples, batch, rt)     # this DP rank's microbatches

Assistant spans are found by rendering message prefixes (the text up to the assistant's
generation prompt, and the text through its message) and mapping those character offsets to
tokens, so any chat template works, with or without ``{% generation %}`` support.

Imports neither megatron-core nor ModelOpt (cheap for ``--preflight``).
"""
from __future__ import annotations

import bisect
import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from post_training.config import BUILTIN_CHAT, SFTDataConfig
from post_training.data import load_dataset
from post_training.utils import UsageError, print_rank_0, warn_rank_0

CHAT_SET = Path(__file__).resolve().parent / "resources" / "chat_calibration.jsonl"

CHAT_COLUMNS = ("messages", "conversations", "conversation")
# (prompt, response) column pairs, in detection order; Alpaca's optional "input" joins the instruction
PAIR_COLUMNS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "output"),
                ("question", "answer"))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


# ----------------------------------------------------------------------------- formats

def detect_format(columns: list[str], field: str | None, source: str) -> tuple[str, list[str]]:
    """("chat", [column]) or ("pair", [prompt column, response column]). ``field``: one chat
    column, or "prompt_col,response_col"."""
    cols = list(columns)
    if field:
        names = [f.strip() for f in field.split(",") if f.strip()]
        for n in names:
            if n not in cols:
                raise UsageError(f"--finetune-data-field {n!r} is not a column of {source} "
                                 f"(columns: {', '.join(cols)})")
        if len(names) not in (1, 2):
            raise UsageError("--finetune-data-field takes one chat column or 'prompt,response' columns")
        return ("chat" if len(names) == 1 else "pair"), names
    for c in CHAT_COLUMNS:
        if c in cols:
            return "chat", [c]
    for p, r in PAIR_COLUMNS:
        if p in cols and r in cols:
            return "pair", [p, r]
    pairs = ", ".join(f"{p}/{r}" for p, r in PAIR_COLUMNS)
    raise UsageError(f"cannot tell the chat format of {source}: columns {', '.join(cols) or '(none)'}; "
                     f"expected 'messages' (role/content), 'conversations' (from/value) or {pairs}; "
                     f"name the column with --finetune-data-field")


def _message(m, where: str) -> dict:
    if not isinstance(m, dict):
        raise UsageError(f"{where}: a message is {type(m).__name__}, not a dict")
    m = {k: v for k, v in m.items() if v is not None}  # datasets fills absent struct keys with None
    if "role" in m:
        msg = dict(m)
    elif "from" in m:
        role = SHAREGPT_ROLES.get(str(m["from"]).lower())
        if role is None:
            raise UsageError(f"{where}: unknown ShareGPT speaker {m['from']!r} "
                             f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        msg = {"role": role, "content": m.get("value", "")}
    else:
        raise UsageError(f"{where}: a message has keys {', '.join(sorted(m)) or '(none)'}; "
                         f"expected role/content or from/value")
    msg.setdefault("content", "")
    if not isinstance(msg["content"], str):
        raise UsageError(f"{where}: message content must be text (got {type(msg['content']).__name__})")
    return msg


def to_messages(row: dict, fmt: tuple[str, list[str]], where: str) -> list[dict]:
    """One dataset row as a list of {"role", "content"} messages."""
    kind, cols = fmt
    if kind == "chat":
        value = row[cols[0]]
        if not isinstance(value, list) or not value:
            raise UsageError(f"{where}: column {cols[0]!r} must hold a non-empty list of messages")
        return [_message(m, where) for m in value]
    prompt, response = row[cols[0]], row[cols[1]]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise UsageError(f"{where}: columns {cols[0]!r} and {cols[1]!r} must hold text")
    extra = row.get("input") if cols[0] == "instruction" else None
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def load_conversations(cfg: SFTDataConfig) -> list[list[dict]]:
    """Every conversation of the configured source(s), in file order."""
    if cfg.hf_dataset:
        specs = [cfg.hf_dataset]
    else:
        specs = [str(CHAT_SET) if f == BUILTIN_CHAT else f for f in cfg.files] or [str(CHAT_SET)]
    convs: list[list[dict]] = []
    for spec in specs:
        ds = load_dataset(spec, cfg.data_split, "training data")
        if len(ds) == 0:
            raise UsageError(f"training data {spec} has no rows")
        fmt = detect_format(ds.column_names, cfg.field, spec)
        keep = [c for c in (*fmt[1], "input", "system") if c in ds.column_names]
        for i, row in enumerate(ds.select_columns(keep)):
            convs.append(to_messages(row, fmt, f"{spec} row {i}"))
    return convs


# ----------------------------------------------------------------------------- tokenization

def _render(tokenizer, msgs: list[dict], generation_prompt: bool, prefix: bool = True) -> str:
    if not msgs and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's TemplateError and whatever a template raises
        if prefix:  # some templates reject a prefix (e.g. one that must end with a user turn)
            return ""
        roles = ", ".join(m["role"] for m in msgs)
        raise UsageError(f"the chat template rejects a conversation (roles {roles}): "
                         f"{' '.join(str(e).split())[:200]}") from None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first difference
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply: from the end
    of the prefix rendered with the generation prompt to the end of the prefix through the
    reply (its end-of-turn tokens included: the model must learn to stop). A template that
    renders earlier turns differently once more follow still gives the common part."""
    full = _render(tokenizer, messages, False, prefix=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _common_prefix(full, _render(tokenizer, messages[:i], True))
        end = _common_prefix(full, _render(tokenizer, messages[:i + 1], False))
        if end > start:
            spans.append((start, end))
    return full, spans


def tokenize_conversation(messages: list[dict], tokenizer, all_tokens: bool = False
                          ) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = predict this token) of one conversation."""
    full, spans = assistant_spans(messages, tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = np.array(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.int64)
        for s, e in spans:  # a token that overlaps a reply is the model's to produce (" Four" after "BOT:")
            mask[(offsets[:, 0] < e) & (offsets[:, 1] > s)] = 1
        mask = mask.tolist()
    else:  # no offsets: tokenize the pieces between span boundaries separately
        cuts = sorted({0, len(full), *[c for sp in spans for c in sp]})
        ids, mask = [], []
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            mask += [int(any(s <= a < e for s, e in spans))] * len(piece)
    if all_tokens:
        mask = [1] * len(ids)
    if mask:
        mask[0] = 0  # a document's first token is never a target (nothing of it precedes it)
    return ids, mask


# ----------------------------------------------------------------------------- packing

def pack(docs: list[tuple[list[int], list[int]]], length: int, pad_id: int, packed: bool
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples of ``length`` tokens. Packed: best fit (each document, in the given order, goes
    to the open sample it fills most tightly, else starts a new one; documents are never
    split); else one document a sample. The rest is padding with loss mask 0. Returns tokens,
    loss_mask and document ids (0, 1, ... per sample; padding -1, a document of its own, so
    it never shares attention with real tokens), each [samples, length]."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row) of the rows with room
    for doc in docs:
        n = len(doc[0])
        at = bisect.bisect_left(free, (n, -1)) if packed else len(free)
        if at < len(free):
            room, r = free.pop(at)
        else:
            room, r = length, len(rows)
            rows.append([])
        rows[r].append(doc)
        if packed and room - n > 0:
            bisect.insort(free, (room - n, r))
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.long)
    doc_ids = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, mask) in enumerate(row):
            tokens[r, at:at + len(ids)] = torch.tensor(ids)
            loss_mask[r, at:at + len(ids)] = torch.tensor(mask)
            doc_ids[r, at:at + len(ids)] = d
            at += len(ids)
    return tokens, loss_mask, doc_ids


def reset_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at each document: [..., S] document ids -> [..., S] positions."""
    s = doc_ids.size(-1)
    idx = torch.arange(s).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    return idx - first


def packed_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of [b, S] document ids: [b, 1, S, S] bool, True = masked
    (Megatron's convention): a token sees earlier tokens of its own document only."""
    s = doc_ids.size(-1)
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return (~(same & causal)).unsqueeze(1)


class SFTSplit:
    """Tokenized, fixed-length samples of ``seq_length + 1`` tokens.

    ``split[i]``: "tokens" Long[S+1]; "loss_mask" Long[S+1] (1 = predict this token, as
    ``training.microbatches``); "position_ids" Long[S] (for the inputs ``tokens[:-1]``);
    with --reset-attention-mask also "document_ids" Long[S], from which ``training.collate``
    builds the [1, S, S] block-diagonal mask of only this DP rank's microbatches (S x S masks
    of a whole global batch would cost gbs * S^2 bytes on every rank)."""

    def __init__(self, tokens: torch.Tensor, loss_mask: torch.Tensor, doc_ids: torch.Tensor, *,
                 seed: int, name: str, num_documents: int, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False):
        self.tokens, self.loss_mask, self.doc_ids = tokens, loss_mask, doc_ids
        self.seed, self.name, self.num_documents = seed, name, num_documents
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self._salt = sum(name.encode())  # train and valid orders differ for one seed

    def __len__(self) -> int:
        return self.tokens.size(0)

    @property
    def seq_length(self) -> int:
        return self.tokens.size(1) - 1

    def __getitem__(self, i: int) -> dict:
        s = self.seq_length
        doc = self.doc_ids[i, :s]
        out = {"tokens": self.tokens[i], "loss_mask": self.loss_mask[i],
               "position_ids": reset_positions(doc) if self.reset_position_ids else torch.arange(s)}
        if self.reset_attention_mask:
            out["document_ids"] = doc
        return out

    @functools.lru_cache(maxsize=4)
    def order(self, epoch: int) -> list[int]:
        """The sample order of one epoch: a permutation drawn from (seed, split, epoch)."""
        rng = np.random.default_rng([self.seed, self._salt, epoch])
        return rng.permutation(len(self)).tolist()

    def fill(self) -> float:
        """Share of the tokens that belong to a document (not padding)."""
        return (self.doc_ids >= 0).float().mean().item()


def global_batches(split: SFTSplit, global_batch_size: int, consumed_samples: int = 0
                   ) -> Iterator[list[dict]]:
    """Endless global batches: sample number k (counted from the start of training) is
    ``split[split.order(k // len)[k % len]]``, so the sequence depends only on the seed and
    ``consumed_samples`` (a resume continues it) and each epoch is reshuffled."""
    if global_batch_size < 1:
        raise UsageError(f"global batch size must be >= 1 (got {global_batch_size})")
    k, n = consumed_samples, len(split)
    while True:
        batch = []
        for _ in range(global_batch_size):
            epoch, pos = divmod(k, n)
            batch.append(split[split.order(epoch)[pos]])
            k += 1
        yield batch


# ----------------------------------------------------------------------------- datasets

def build_sft_datasets(cfg: SFTDataConfig, tokenizer, seq_length: int, seed: int
                       ) -> tuple[SFTSplit, SFTSplit | None]:
    """Train and validation splits (validation: ``valid_fraction`` of the conversations,
    None when that is 0 or rounds to no conversation)."""
    if seq_length < 2:
        raise UsageError(f"--seq-length must be >= 2 for training (got {seq_length})")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template: SFT data is rendered with it")
    if not cfg.pack and (cfg.reset_position_ids or cfg.reset_attention_mask):
        warn_rank_0("--reset-position-ids / --reset-attention-mask do nothing with --no-pack-sequences")
    convs = load_conversations(cfg)
    length = seq_length + 1
    docs, truncated, empty = [], 0, 0
    for msgs in convs:
        ids, mask = tokenize_conversation(msgs, tokenizer, cfg.all_tokens)
        if len(ids) > length:
            ids, mask = ids[:length], mask[:length]
            truncated += 1
        if sum(mask) == 0:
            empty += 1
            continue
        docs.append((ids, mask))
    if not docs:
        raise UsageError(f"training data {cfg.source}: no assistant tokens to train on in "
                         f"{len(convs)} conversations (after truncation to {length} tokens); "
                         f"check the roles, or pass --train-on-all-tokens")
    order = np.random.default_rng([seed, 0]).permutation(len(docs)).tolist()
    n_valid = int(len(docs) * cfg.valid_fraction)
    if cfg.valid_fraction > 0 and (n_valid == 0 or n_valid == len(docs)):
        warn_rank_0(f"--finetune-valid-fraction {cfg.valid_fraction} of {len(docs)} conversations "
                    f"holds none out: no validation split")
        n_valid = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    packed = cfg.pack
    resets = dict(reset_position_ids=cfg.reset_position_ids and packed,
                  reset_attention_mask=cfg.reset_attention_mask and packed)

    def split(indices: list[int], name: str) -> SFTSplit:
        t, m, d = pack([docs[i] for i in indices], length, pad_id or 0, packed)
        return SFTSplit(t, m, d, seed=seed, name=name, num_documents=len(indices), **resets)

    train = split(order[n_valid:], "train")
    valid = split(order[:n_valid], "valid") if n_valid else None
    print_rank_0(
        f"training data {cfg.source}: {len(convs)} conversations -> {len(train)} train samples of "
        f"{length} tokens ({train.num_documents} conversations, {train.fill():.0%} filled"
        f"{', packed' if packed else ''})"
        + (f", {len(valid)} validation samples ({valid.num_documents} conversations)" if valid else "")
        + (f"; {truncated} longer than {length} tokens truncated" if truncated else "")
        + (f"; {empty} without assistant tokens dropped" if empty else ""))
    return train, valid
