"""Post-training toolkit for Megatron models: quantize, distill, speculative decoding, export.

Importing any module of this package changes nothing outside it: upstream changes are applied
by the runtime (:mod:`post_training.runtime.patches`), warning filters by the entry points.
"""
__version__ = "0.1.0"
