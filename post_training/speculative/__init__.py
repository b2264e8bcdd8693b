"""Lossless speculative decoding.

drafters.py: the :class:`Drafter` protocol, prompt lookup (:class:`NgramDrafter`), a smaller model
of the same tokenizer (:class:`ModelDrafter`), :func:`build_drafter` from a DraftConfig.
decode.py: :func:`speculative_generate` (one target forward verifies K drafts against the KV
cache, rejected positions rolled back; greedy or speculative sampling) and :class:`SpecStats`.

Names resolve on first use, so importing a light submodule (prompt loading) does not load
megatron-core.
"""
from importlib import import_module

_EXPORTS = {"Drafter": "drafters", "NgramDrafter": "drafters", "ModelDrafter": "drafters",
            "build_drafter": "drafters", "SpecStats": "decode", "speculative_generate": "decode"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
