"""Low-level file I/O shared by the runtime code and the offline checkpoint tools, one home each:

- :mod:`.atomic`          staged outputs: hidden sibling, debris removal, fsync, commit by rename
- :mod:`.safetensors_io`  the one safetensors shard writer (HF naming and index)
- :mod:`.formats`         dtype names, which files are weights, byte sizes, sha256
- :mod:`.layout`          Megatron-LM's checkpoint layout: tracker, records, rotation
- :mod:`.hf_files`        HF model directories: side files, config dtype, finishing an export

Imports nothing of megatron-core, ModelOpt or transformers at module level (the offline tools
stay light), and nothing of the toolkit above :mod:`post_training.utils`.
"""
