"""Data: prompt files, the built-in offline text, token windows, and the one loader of
``datasets`` sources (hub names when online, local files and dataset directories always)."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Union

from post_training.utils import UsageError

Prompt = Union[str, list]  # plain text, or a list of {"role", "content"} messages

DEFAULT_PROMPTS: list[Prompt] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what quantization does to a neural network.",
]


def read_user_text(path: str | Path, what: str, encoding: str = "utf-8") -> tuple[Path, str]:
    """A user's text file, or one clear error: missing, not text, or empty."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} not found: {p}")
    try:
        text = p.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise UsageError(f"{what} {p} is not UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"{what} {p} is empty")
    return p, text


def _check_messages(msgs, where: str) -> list:
    if not isinstance(msgs, list) or not msgs or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs
    ):
        raise UsageError(f"{where}: expected a list of {{'role', 'content'}} chat messages")
    return msgs


def _as_prompt(item, where: str) -> Prompt:
    if isinstance(item, str):
        if not item.strip():
            raise UsageError(f"{where}: empty prompt")
        return item
    if isinstance(item, dict) and "messages" in item:
        return _check_messages(item["messages"], where)
    return _check_messages(item, where)


def load_prompts(path: str | None) -> list[Prompt]:
    """A json list (strings or message lists), jsonl (one prompt, message list or
    {"messages": [...]} a line, read with ``datasets``), or text (one prompt a line)."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p, text = read_user_text(path, "prompts file")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"prompts file {p} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not data:
            raise UsageError(f"prompts file {p}: expected a non-empty JSON list")
        return [_as_prompt(x, f"{p}[{i}]") for i, x in enumerate(data)]
    if p.suffix == ".jsonl":
        return _load_jsonl(p)
    return [line for line in text.splitlines() if line.strip()]


def json_lines(text: str, where: str) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of a jsonl text; a line that is not JSON is
    one error naming it (``where``: "prompts file F"). Callers check lines this way before
    handing a file to datasets, whose errors on bad JSON are long tracebacks without the line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} line {n} is not valid JSON: {e.msg}") from None
    return rows


def _load_jsonl(p: Path) -> list[Prompt]:
    rows = [row for _, row in json_lines(p.read_text(encoding="utf-8"), f"prompts file {p}")]
    if all(isinstance(r, dict) for r in rows):
        import datasets

        ds = datasets.load_dataset("json", data_files=str(p), split="train")
        rows = list(ds)
    return [_as_prompt(r, f"{p} line {i + 1}") for i, r in enumerate(rows)]


def render_prompt(prompt: Prompt, tokenizer, chat_template: bool = True) -> list[int]:
    """Token ids for a prompt: chat template (generation prompt added) or raw text."""
    if not chat_template:
        if not isinstance(prompt, str):
            raise UsageError("chat messages need the chat template (drop --no-chat-template)")
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("the tokenizer has no chat template; pass --no-chat-template for raw text")
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


# ----------------------------------------------------------------------------- built-in text

# Standard-library modules whose documentation forms the offline text sets: technical English
# that every Python ships, so calibration and evaluation need no network. Alternate modules go
# to the two splits, so they never share a paragraph.
_DOC_MODULES = (
    "abc argparse array ast asyncio base64 binascii bisect bz2 calendar cmath codecs collections "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime dbm decimal difflib "
    "dis doctest email enum fnmatch fractions ftplib functools gc gettext glob gzip hashlib heapq "
    "hmac html.parser http.client imaplib importlib inspect io itertools json locale logging lzma "
    "mailbox math mimetypes mmap multiprocessing operator os pathlib pdb pickle pkgutil poplib "
    "pprint queue random re secrets select selectors shelve shutil signal smtplib socket sqlite3 "
    "ssl statistics string struct subprocess tarfile tempfile textwrap threading timeit tokenize "
    "trace traceback tracemalloc typing unittest urllib.request uuid warnings weakref wsgiref "
    "xml.etree.ElementTree xmlrpc.client zipfile zipimport zlib"
).split()
BUILTIN_SPLITS = ("calib", "eval")


def builtin_text(split: str) -> str:
    """Documentation of half the modules above ('calib': even positions, 'eval': odd)."""
    import importlib
    import inspect

    if split not in BUILTIN_SPLITS:
        raise UsageError(f"built-in text split must be one of {BUILTIN_SPLITS} (got {split!r})")
    parts = []
    for name in _DOC_MODULES[BUILTIN_SPLITS.index(split)::2]:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj) or ""
                if len(doc) > 200:  # skip one-liners: they are mostly signatures
                    parts.append(doc)
    return "\n\n".join(p for p in parts if p)


def token_chunks(text: str, tokenizer, seq_length: int, max_chunks: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping ``seq_length``-token windows of ``text`` (the tail that does
    not fill a window is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_length
    if max_chunks is not None:
        n = min(n, max_chunks)
    return [ids[i * seq_length:(i + 1) * seq_length] for i in range(n)]


# ----------------------------------------------------------------------------- datasets

# Local files: suffix -> datasets builder (any other suffix is read as text).
DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
                    ".text": "text", ".csv": "csv"}


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs each retry of an unreachable hub as a warning; the failure itself
    becomes our one-line error, so the retries are not shown."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_dataset(spec: str, split: str, what: str):
    """A ``datasets.Dataset`` from a local file (builder by suffix; registered under ``split``,
    so any split name works), a local dataset directory, or a hub name. ``what`` names the
    source in errors ("calibration dataset", "--eval-dataset")."""
    import datasets

    p = Path(spec)
    try:
        with _quiet_hub():
            if p.is_file():
                if p.stat().st_size == 0:
                    raise UsageError(f"{what} {p} is empty")
                builder = DATASET_BUILDERS.get(p.suffix.lower(), "text")
                return datasets.load_dataset(builder, data_files={split: str(p)}, split=split)
            if p.suffix.lower() in DATASET_BUILDERS:
                raise UsageError(f"{what} not found: {p}")
            return datasets.load_dataset(str(p) if p.is_dir() else spec, split=split)
    except UsageError:
        raise
    except Exception as e:  # offline hub, bad split, unreadable file: many types, long messages
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"cannot load {what} {spec!r} split {split!r}: {msg[:300]}") from None
