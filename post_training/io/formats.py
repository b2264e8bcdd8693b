"""Formats and sizes: dtype names, which files are weights, byte sizes, file hashes."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from post_training.utils import UsageError

# The dtype names of flags (--bf16, --export-dtype, the tools' --dtype); "keep" is the tools' default.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Weight files of any format and weight indexes: what is never copied as a "side file" of a model
# directory (the tokenizer, config and templates are).
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt|onnx)$|.*\.index\.json$")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def torch_dtype(name: str) -> torch.dtype | None:
    """``bf16`` -> ``torch.bfloat16``; ``keep`` -> None (each tensor keeps its own)."""
    return None if name == "keep" else DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``, as config.json states it."""
    return str(dtype).removeprefix("torch.")


def is_weight_file(name: str) -> bool:
    return WEIGHT_FILE.fullmatch(name) is not None


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """'5GB' / '500MB' (decimal, as huggingface_hub counts) / '2GiB' / bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) < 1:
        raise UsageError(f"{flag} must be a positive size like 5GB, 500MB or 2GiB (got {text!r})")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
