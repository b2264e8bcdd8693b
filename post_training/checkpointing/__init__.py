"""Checkpoints: saving and loading megatron-core dist checkpoints with ModelOpt state
(:mod:`.save`, :mod:`.load`), and the offline checkpoint tools (:mod:`.tools`, which depend only
on :mod:`post_training.io` and never import megatron-core).

The names below are imported on first use, so ``post_training.checkpointing.tools`` stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "save_checkpoint": "post_training.checkpointing.save",
    "load_model_checkpoint": "post_training.checkpointing.load",
    "load_training_state": "post_training.checkpointing.load",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
