"""Formats and sizes: human-readable byte sizes."""
from __future__ import annotations

import re

from post_training.utils import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """'5GB' / '500MB' (decimal, as huggingface_hub counts) / '2GiB' / bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not m or int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) < 1:
        raise UsageError(f"{flag} must be a positive size like 5GB, 500MB or 2GiB (got {text!r})")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
