"""Checkpoint tools: ``python -m post_training.ckpt <command>`` (console script ``pt-ckpt``).

Commands (one module each, registered in :mod:`post_training.checkpointing.tools.cli`):

- ``inspect``         explain a directory or file: which files are the model, which resume training,
                      which are safe to edit, which would run pickle code when loaded
- ``consolidate``     sharded checkpoint (toolkit/Megatron dist, Megatron legacy, DeepSpeed ZeRO)
                      -> one Hugging Face safetensors directory, streamed tensor by tensor
- ``merge-lora``      fold a PEFT LoRA adapter into its base model
- ``to-safetensors``  convert a ``.pt/.bin`` state dict without executing untrusted pickle code
- ``to-gguf``         write a GGUF file (f16 / q8_0) from a Llama-family checkpoint

Every command writes into a hidden staging directory beside the output and renames it into
place when done (:mod:`post_training.io.atomic`), so a failure never leaves a partial output.
"""
