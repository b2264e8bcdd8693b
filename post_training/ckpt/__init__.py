"""``python -m post_training.ckpt COMMAND``: the documented short name of the checkpoint tools,
which live in :mod:`post_training.checkpointing.tools`."""
