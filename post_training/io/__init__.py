"""Low-level file I/O shared by the runtime code and the offline checkpoint tools: Megatron-LM's
checkpoint layout on disk, atomic output directories, safetensors shards, formats and sizes.

Imports nothing of megatron-core, ModelOpt or transformers (the offline tools stay light), and
nothing of the toolkit above :mod:`post_training.utils`.
"""
