"""The tokenizer half of ``to-gguf``: an HF byte-level BPE tokenizer as ``tokenizer.*`` GGUF keys.

GGUF carries no ``tokenizer.json``; llama.cpp (and transformers' GGUF loader) rebuild the
tokenizer from the vocabulary, the merges, per-token types, the special token ids and a
pre-tokenizer *name* that selects the split regex. Only byte-level BPE (GPT-2 style: Llama 3,
SmolLM, Qwen2/3, Mistral tekken) is written; a sentencepiece-style vocabulary is refused.

The file is read as JSON rather than through ``AutoTokenizer`` so conversion needs no
tokenizer classes and sees exactly what the directory says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from post_training.utils import UsageError

# llama.cpp's token types (gguf.TokenType), copied so reading a vocabulary needs no gguf import.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# Split regexes as HF tokenizer.json files spell them -> llama.cpp's pre-tokenizer name. The
# name is all a GGUF reader gets, so a regex not listed here cannot be described faithfully.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX_NAMES: dict[str, str] = {
    _LLAMA3_REGEX: "llama-bpe",
    _QWEN2_REGEX: "qwen2",
    _TEKKEN_REGEX: "tekken",
}

SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass
class GGUFVocab:
    """Everything the ``tokenizer.*`` keys hold, in GGUF terms."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | list[dict[str, str]] | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e})") from None


def _pre_tokenizer_name(pre: dict[str, Any] | None, path: Path) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, or a UsageError naming what it found."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    last = steps[-1]
    if kinds[-1:] != ["ByteLevel"] or last.get("add_prefix_space"):
        raise UsageError(f"{path}: pre-tokenizer {kinds} is not byte-level BPE without a prefix space; "
                         "to-gguf writes GPT-2-style (byte-level) tokenizers only")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    # Digits one by one, then the GPT-2 regex: StarCoder's split, which SmolLM inherited.
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEX_NAMES:
            return SPLIT_REGEX_NAMES[regex]
        raise UsageError(f"{path}: split regex {regex!r} has no llama.cpp pre-tokenizer name "
                         f"(known: {', '.join(sorted(SPLIT_REGEX_NAMES.values()))}, gpt-2, smollm)")
    raise UsageError(f"{path}: pre-tokenizer sequence {kinds} has no llama.cpp equivalent")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _looks_special(token: str) -> bool:
    # Same heuristic as llama.cpp: some added tokens are control tokens without the flag.
    return token.startswith(("<|", "<｜")) and token.endswith(("|>", "｜>"))


def _auto_adds(post: dict[str, Any] | None) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) as the tokenizer.json post-processor does it to a single sequence."""
    if not post:
        return False, False
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for proc in procs:
        if proc.get("type") == "TemplateProcessing" and proc.get("single"):
            single = proc["single"]
            return "SpecialToken" in single[0], "SpecialToken" in single[-1]
    return False, False


def _chat_template(hf_dir: Path, tok_cfg: dict[str, Any]) -> str | list[dict[str, str]] | None:
    """transformers 5 saves the template as chat_template.jinja; older saves keep it in the config
    (a string, or a list of named templates that gguf's writer stores as named keys)."""
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return tok_cfg.get("chat_template") or None


def read_vocab(hf_dir: Path, vocab_size: int, config: dict[str, Any]) -> GGUFVocab:
    """Read ``tokenizer.json`` (+ ``tokenizer_config.json``) into GGUF form, padded to
    ``vocab_size`` (the embedding rows) with ``[PAD<i>]`` tokens as llama.cpp does."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        spm = " (a sentencepiece tokenizer.model is not supported)" if (hf_dir / "tokenizer.model").is_file() else ""
        raise UsageError(f"{hf_dir} has no tokenizer.json{spm}")
    tok = _read_json(path)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "sentencepiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise UsageError(f"{path}: tokenizer model {kind} is not supported; to-gguf writes byte-level BPE only")
    pre = _pre_tokenizer_name(tok.get("pre_tokenizer"), path)

    id_to_token: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        id_to_token[i] = a["content"]
    if id_to_token and max(id_to_token) >= vocab_size:
        raise UsageError(f"{path}: token id {max(id_to_token)} does not fit the model's vocab_size {vocab_size}")

    tokens, types = [], []
    for i in range(vocab_size):
        text = id_to_token.get(i)
        if text is None:  # embedding rows no token uses (vocab padded for efficiency)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(CONTROL if added[i].get("special") or _looks_special(text) else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok_cfg = _read_json(hf_dir / "tokenizer_config.json") if (hf_dir / "tokenizer_config.json").is_file() else {}
    token_to_id = {t: i for i, t in id_to_token.items()}
    special_ids: dict[str, int] = {}
    for kind in SPECIAL_KINDS:
        text = _token_text(tok_cfg.get(f"{kind}_token"))
        if text is not None and text in token_to_id:
            special_ids[kind] = token_to_id[text]
            continue
        cfg_id = config.get(f"{kind}_token_id")  # config.json fallback; eos may be a list
        cfg_id = cfg_id[0] if isinstance(cfg_id, list) and cfg_id else cfg_id
        if isinstance(cfg_id, int) and 0 <= cfg_id < vocab_size:
            special_ids[kind] = cfg_id

    add_bos, add_eos = _auto_adds(tok.get("post_processor"))
    if isinstance(tok_cfg.get("add_bos_token"), bool):
        add_bos = tok_cfg["add_bos_token"]
    if isinstance(tok_cfg.get("add_eos_token"), bool):
        add_eos = tok_cfg["add_eos_token"]
    return GGUFVocab(tokens=tokens, token_types=types, merges=merges, pre=pre, special_ids=special_ids,
                     add_bos=add_bos, add_eos=add_eos, chat_template=_chat_template(hf_dir, tok_cfg))


def write_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Add the ``tokenizer.*`` keys to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
