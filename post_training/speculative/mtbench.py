"""MT-Bench-style prompt sets for acceptance measurement.

Formats, detected per row:

- the hub's ``HuggingFaceH4/mt_bench_prompts`` rows: ``prompt`` (list of turns), ``category``
  (``prompt_id`` optional); the built-in set (``resources/spec_prompts.jsonl``, questions written
  for this project in MT-Bench's eight categories) has this format;
- FastChat's ``question.jsonl``: ``question_id``, ``category``, ``turns``;
- any chat prompt file: ``messages`` / ``conversations`` (the user turns are the turns),
  ``category`` optional.

Local jsonl / json / parquet files and hub names all go through :func:`post_training.data.load_dataset`.
No megatron-core here: the launcher's ``--preflight`` loads and checks the set.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from post_training.config.speculative import BUILTIN_PROMPTS, MTBENCH_CATEGORIES
from post_training.data import json_lines
from post_training.utils import UsageError

__all__ = ["MTBenchPrompt", "BUILTIN_PATH", "load_mtbench", "select_prompts", "turn_messages",
           "category_order"]

BUILTIN_PATH = Path(__file__).resolve().parents[1] / "resources" / "spec_prompts.jsonl"
OTHER = "other"  # category of chat rows that name none


@dataclass(frozen=True)
class MTBenchPrompt:
    id: str
    category: str
    turns: tuple[str, ...]


def _turns_of(row: dict) -> list | None:
    for key in ("turns", "prompt"):
        if row.get(key) is not None:  # datasets fills a column some rows lack with None
            return [row[key]] if isinstance(row[key], str) else row[key]
    for key in ("messages", "conversations"):
        if isinstance(row.get(key), list):
            msgs = row[key]
            if not all(isinstance(m, dict) for m in msgs):
                return None
            # OpenAI-style {role, content} or ShareGPT-style {from, value}
            return [m.get("content", m.get("value")) for m in msgs
                    if m.get("role", m.get("from")) in ("user", "human")]
    return None


def _row_prompt(row, where: str, n: int) -> MTBenchPrompt:
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected an object with 'turns' (FastChat question.jsonl), "
                         "'prompt' (mt_bench_prompts) or 'messages'")
    turns = _turns_of(row)
    if turns is None:
        raise UsageError(f"{where}: no 'turns' (FastChat question.jsonl), 'prompt' "
                         f"(mt_bench_prompts) or 'messages' (keys: {', '.join(map(str, row))})")
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise UsageError(f"{where}: turns must be a non-empty list of non-empty strings")
    category = row.get("category")
    if category is None and (row.get("messages") is not None or row.get("conversations") is not None):
        category = OTHER
    if not isinstance(category, str) or not category.strip():
        raise UsageError(f"{where}: missing 'category'")
    pid = next((row[k] for k in ("question_id", "prompt_id") if row.get(k) is not None), n)
    return MTBenchPrompt(id=str(pid), category=category.strip().lower(), turns=tuple(turns))


def _check_json_lines(p: Path) -> None:
    # datasets reports a bad line as a long traceback without the line number: check first.
    for n, row in json_lines(p.read_text(encoding="utf-8"), f"prompt file {p}"):
        _row_prompt(row, f"prompt file {p} line {n}", n)


def load_mtbench(spec: str = BUILTIN_PROMPTS) -> list[MTBenchPrompt]:
    """Every prompt of ``spec``: ``builtin``, a local jsonl/json/parquet file, or a hub name."""
    from post_training.data import load_dataset

    path = BUILTIN_PATH if spec == BUILTIN_PROMPTS else Path(spec)
    if path.is_file():
        if path.stat().st_size == 0:
            raise UsageError(f"prompt file {path} is empty")
        try:
            text = path.read_text(encoding="utf-8") if path.suffix.lower() != ".parquet" else None
        except UnicodeDecodeError:
            raise UsageError(f"prompt file {path} is not UTF-8 text") from None
        if path.suffix.lower() == ".jsonl":
            _check_json_lines(path)
            where = "line"
        elif path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"prompt file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
            if not isinstance(data, list):
                raise UsageError(f"prompt file {path}: expected a JSON list of rows")
            for i, row in enumerate(data):
                _row_prompt(row, f"prompt file {path} row {i}", i)
            where = "row"
        elif path.suffix.lower() == ".parquet":
            where = "row"
        else:
            raise UsageError(f"prompt file {path}: expected .jsonl, .json or .parquet")
        rows = load_dataset(str(path), "train", "prompt file")
        start = 1 if where == "line" else 0
        return [_row_prompt(r, f"prompt file {path} {where} {i}", i)
                for i, r in enumerate(rows, start)]
    if path.suffix.lower() in (".jsonl", ".json", ".parquet") or path.exists():
        raise UsageError(f"prompt file not found: {path}")
    rows = load_dataset(spec, "train", "--mtbench-path")
    out = [_row_prompt(r, f"{spec} row {i}", i) for i, r in enumerate(rows)]
    if not out:
        raise UsageError(f"--mtbench-path {spec} has no rows")
    return out


def category_order(prompts: list[MTBenchPrompt]) -> list[str]:
    """MT-Bench's order first, then other categories as they appear."""
    seen = list(dict.fromkeys(p.category for p in prompts))
    return [c for c in MTBENCH_CATEGORIES if c in seen] + [c for c in seen if c not in MTBENCH_CATEGORIES]


def select_prompts(prompts: list[MTBenchPrompt], categories: list[str] | None = None,
                   num_prompts: int | None = None, turns: int = 1) -> list[MTBenchPrompt]:
    """The first ``num_prompts`` of each wanted category (all categories when none given), in
    :func:`category_order`. Every prompt must have ``turns`` turns."""
    if categories:
        missing = [c for c in categories if c not in {p.category for p in prompts}]
        if missing:
            raise UsageError(f"no prompts in category {', '.join(missing)}")
        prompts = [p for p in prompts if p.category in categories]
    taken: Counter = Counter()
    out = []
    for cat in category_order(prompts):
        for p in prompts:
            if p.category == cat and (num_prompts is None or taken[cat] < num_prompts):
                taken[cat] += 1
                out.append(p)
    short = [p.id for p in out if len(p.turns) < turns]
    if short:
        raise UsageError(f"--turns {turns}: prompt(s) {', '.join(short[:5])} have fewer turns")
    return out


def turn_messages(prompt: MTBenchPrompt, answers: list[str]) -> list[dict]:
    """The chat for turn ``len(answers) + 1``: earlier turns with the model's own answers (as
    FastChat builds the second turn of MT-Bench)."""
    msgs = []
    for question, answer in zip(prompt.turns, answers):
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs + [{"role": "user", "content": prompt.turns[len(answers)]}]
