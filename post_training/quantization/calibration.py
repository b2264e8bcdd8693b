"""Calibration data: windows of tokens from the built-in offline text or a ``datasets`` source
(chat datasets rendered with the model's chat template), and the loop ModelOpt calls."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from post_training.config import BUILTIN, BUILTIN_CHAT, CalibConfig
from post_training.data import builtin_text, load_dataset, token_chunks
from post_training.utils import UsageError

# Questions written for this project, answered by the embedded model itself (made by
# examples/data/make_chat_calibration.py; nothing from MT-Bench).
CHAT_SET = Path(__file__).resolve().parents[1] / "resources" / "chat_calibration.jsonl"


def _sample_text(row: dict, field: str | None, tokenizer) -> str:
    if field is None:
        field = "messages" if "messages" in row else "conversations" if "conversations" in row else "text"
    if field not in row:
        raise UsageError(f"calibration dataset has no field {field!r} (fields: {', '.join(row)}); "
                         f"pass --calib-dataset-field")
    value = row[field]
    if isinstance(value, list):  # chat messages
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("chat-format calibration data needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(value, tokenize=False)
    return str(value)


def calibration_samples(ccfg: CalibConfig, tokenizer) -> list[list[int]]:
    """``calib_size`` windows of ``calib_seq_length`` tokens from the calibration source."""
    if ccfg.calib_dataset == BUILTIN:
        text = builtin_text("calib")
    else:
        spec = str(CHAT_SET) if ccfg.calib_dataset == BUILTIN_CHAT else ccfg.calib_dataset
        ds = load_dataset(spec, ccfg.calib_split, "calibration dataset")
        if len(ds) == 0:
            raise UsageError(f"calibration dataset {ccfg.calib_dataset} has no rows")
        need = ccfg.calib_size * ccfg.calib_seq_length
        parts, chars = [], 0
        for row in ds:  # stop reading once there is clearly enough text (~2 chars per token)
            parts.append(_sample_text(row, ccfg.calib_field, tokenizer))
            chars += len(parts[-1])
            if chars > 8 * need:
                break
        text = "\n\n".join(parts)
    chunks = token_chunks(text, tokenizer, ccfg.calib_seq_length, ccfg.calib_size)
    if len(chunks) < ccfg.calib_size:
        have = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        raise UsageError(
            f"calibration data {ccfg.calib_dataset!r} has {have} tokens: {len(chunks)} samples of "
            f"{ccfg.calib_seq_length}, fewer than --calib-size {ccfg.calib_size}"
        )
    return chunks


def forward_loop(samples: list[list[int]], forward: Callable[[Any, torch.Tensor], Any],
                 progress: bool = True) -> Callable[[Any], None]:
    """The calibration loop ModelOpt calls: every sample once through the model."""
    from tqdm import tqdm

    def loop(model) -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            for ids in tqdm(samples, desc="calibrating", disable=not progress, leave=False):
                forward(model, torch.tensor([ids], device=device))

    return loop
