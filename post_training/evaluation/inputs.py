"""What evaluation reads, checked before any model loads (``--preflight`` runs this module
alone, without megatron-core): the text for perplexity, cut into token windows, and MMLU-format
questions.

MMLU prompt (scored by :mod:`post_training.evaluation.mmlu`): the original MMLU /
lm-evaluation-harness zero-shot template, raw text (no chat template), tokenized with the
tokenizer's own special tokens (its BOS, if it adds one)::

    The following are multiple choice questions (with answers) about {subject}.\\n
    \\n
    {question}\\n
    A. {choice A}\\n
    B. {choice B}\\n
    C. {choice C}\\n
    D. {choice D}\\n
    Answer:

(`` about {subject}`` is left out when a row has no subject; underscores become spaces.) Each
choice is scored by the log-likelihood of the continuation ``" A"`` / ``" B"`` / ``" C"`` /
``" D"`` after the prompt: its tokens are those of prompt + continuation past the prompt's own
tokens (lm-evaluation-harness's rule). The prediction is the best-scoring letter (the first on a
tie); accuracy is the fraction of predictions equal to the answer.

File formats:
- ``.jsonl``: one object a line with ``question``, the choices as ``choices`` (a list of 4) or
  ``A`` ``B`` ``C`` ``D``, ``answer`` (a letter A-D or an index 0-3), optional ``subject``.
- ``.csv``: a header row naming ``question,A,B,C,D,answer`` (``subject`` optional, any order), or
  no header and the original MMLU column order ``question,A,B,C,D,answer``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from post_training.config import EvalConfig
from post_training.data import builtin_text, json_lines, load_dataset, read_user_text, token_chunks
from post_training.utils import UsageError

# ----------------------------------------------------------------------------- text


def _dataset_text(cfg: EvalConfig) -> str:
    ds = load_dataset(cfg.dataset, cfg.dataset_split, "--eval-dataset")
    if cfg.dataset_field not in ds.column_names:
        raise UsageError(f"--eval-dataset {cfg.dataset!r} has no field {cfg.dataset_field!r} "
                         f"(--eval-dataset-field); fields: {', '.join(ds.column_names)}")
    rows = [r for r in ds[cfg.dataset_field] if r is not None]
    if not all(isinstance(r, str) for r in rows):
        raise UsageError(f"--eval-dataset field {cfg.dataset_field!r} is not text")
    # Rows joined by a blank line, as in the usual wikitext perplexity recipe.
    text = "\n\n".join(r for r in rows if r.strip())
    if not text:
        raise UsageError(f"--eval-dataset {cfg.dataset!r} field {cfg.dataset_field!r} has no text")
    return text


def load_eval_text(cfg: EvalConfig) -> str:
    """The text to evaluate: --eval-text-path, --eval-dataset, or the built-in eval split."""
    if cfg.text_path:
        return read_user_text(cfg.text_path, "eval text file")[1]
    if cfg.dataset:
        return _dataset_text(cfg)
    return builtin_text("eval")


def eval_windows(text: str, tokenizer, cfg: EvalConfig, seq_length: int) -> list[list[int]]:
    """The ``seq_length``-token windows to evaluate; a text shorter than one window is a usage
    error (checked before the model loads, so ``--preflight`` catches it)."""
    if seq_length < 2:
        raise UsageError(f"--seq-length must be >= 2 to predict a token (got {seq_length})")
    windows = token_chunks(text, tokenizer, seq_length, cfg.max_chunks)
    if not windows:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        raise UsageError(f"eval text from {cfg.source} has {n} tokens, fewer than one "
                         f"--seq-length window of {seq_length}")
    return windows


def prepare_inputs(cfg: EvalConfig, src, seq_length: int):
    """Token windows (None with ``perplexity`` off) and MMLU questions, built before the model
    loads (bad input fails here)."""
    from post_training.hf import load_tokenizer, source_hf_dir

    questions = load_questions(cfg.mmlu_path) if cfg.mmlu_path else None
    if not cfg.perplexity:
        return None, questions
    tok = load_tokenizer(source_hf_dir(src))
    return eval_windows(load_eval_text(cfg), tok, cfg, seq_length), questions


# ----------------------------------------------------------------------------- MMLU questions

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers){}.\n\n"


@dataclass(kw_only=True)
class Question:
    question: str
    choices: list[str]
    answer: int  # index into LETTERS
    subject: str | None = None

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError("empty question")
        if len(self.choices) != 4 or not all(isinstance(c, str) and c.strip() for c in self.choices):
            raise ValueError("expected 4 non-empty choices")
        if self.answer not in range(4):
            raise ValueError(f"answer index {self.answer} is not in 0-3")


def prompt(q: Question) -> str:
    """The zero-shot prompt for ``q`` (see the module docstring)."""
    about = f" about {q.subject.replace('_', ' ').strip()}" if q.subject and q.subject.strip() else ""
    body = "\n".join(f"{l}. {c.strip()}" for l, c in zip(LETTERS, q.choices))
    return f"{HEADER.format(about)}{q.question.strip()}\n{body}\nAnswer:"


def _answer_index(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    raise UsageError(f"{where}: answer must be a letter A-D or an index 0-3 (got {value!r})")


def _question(row: dict, where: str) -> Question:
    if "choices" in row:
        choices = row["choices"]
    elif all(l in row for l in LETTERS):
        choices = [row[l] for l in LETTERS]
    else:
        raise UsageError(f"{where}: needs 'choices' (a list of 4) or columns A, B, C, D")
    if not isinstance(row.get("question"), str):
        raise UsageError(f"{where}: needs a 'question' string")
    if "answer" not in row:
        raise UsageError(f"{where}: needs an 'answer' (a letter A-D or an index 0-3)")
    subject = row.get("subject")
    try:
        return Question(question=row["question"], choices=list(choices) if isinstance(choices, list) else [],
                        answer=_answer_index(row["answer"], where),
                        subject=subject if isinstance(subject, str) else None)
    except ValueError as e:
        raise UsageError(f"{where}: {e}") from None


def _csv_rows(p: Path, text: str) -> list[tuple[dict, str]]:
    """(row as a dict, where) for a csv with a header naming the columns, or without one."""
    rows = [(n, r) for n, r in enumerate(csv.reader(text.splitlines()), 1) if any(c.strip() for c in r)]
    head = [c.strip() for c in rows[0][1]]
    if {"question", "answer"} <= {c.lower() for c in head}:
        keys, rows = [c if c in LETTERS else c.lower() for c in head], rows[1:]
    else:
        keys = ["question", *LETTERS, "answer"]
    out = []
    for n, r in rows:
        if len(r) != len(keys):
            raise UsageError(f"MMLU file {p} row {n}: expected {len(keys)} columns, got {len(r)}")
        out.append((dict(zip(keys, r)), f"MMLU file {p} row {n}"))
    return out


def load_questions(path: str | Path) -> list[Question]:
    """Questions of an MMLU-format .csv or .jsonl file; any problem is a UsageError naming the
    line or row."""
    p, text = read_user_text(path, "MMLU file", encoding="utf-8-sig")
    if p.suffix.lower() == ".jsonl":
        rows = []
        for n, row in json_lines(text, f"MMLU file {p}"):
            if not isinstance(row, dict):
                raise UsageError(f"MMLU file {p} line {n}: expected a JSON object")
            rows.append((row, f"MMLU file {p} line {n}"))
    elif p.suffix.lower() == ".csv":
        rows = _csv_rows(p, text)
    else:
        raise UsageError(f"MMLU file {p}: expected a .csv or .jsonl file")
    if not rows:
        raise UsageError(f"MMLU file {p} has no questions")
    return [_question(r, w) for r, w in rows]


def encode(q: Question, tokenizer) -> tuple[list[int], list[list[int]]]:
    """Prompt token ids and, per choice, the continuation token ids to score."""
    text = prompt(q)
    ctx = tokenizer(text, add_special_tokens=True)["input_ids"]
    conts = []
    for letter in LETTERS:
        whole = tokenizer(f"{text} {letter}", add_special_tokens=True)["input_ids"]
        if whole[:len(ctx)] != ctx or len(whole) == len(ctx):  # the merge crossed the boundary
            whole = ctx + tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        conts.append(whole[len(ctx):])
    return ctx, conts
