"""Evaluation: perplexity (:mod:`.perplexity`) and zero-shot MMLU-format accuracy (:mod:`.mmlu`)
on inputs read before any model loads (:mod:`.inputs`)."""
