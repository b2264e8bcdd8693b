"""Entry points run by scripts/*.sh (``python -m post_training.cli.<task>``).

Each task parses its flags (:mod:`post_training.arguments`), checks what it can before touching
process groups (``--preflight``: the launcher rejects bad input before torchrun starts N
ranks), starts the runtime, calls one library function and prints. Importing this package sets
the process's warning filters (:func:`quiet_upstream_warnings`): entry points are processes of
their own, library imports change nothing.
"""
from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch.distributed as dist

from post_training.utils import run_main

# Import-time notices of megatron-core / ModelOpt that say nothing actionable to a user of the
# scripts (the local spec is chosen on purpose, and says so). Narrow, message-matched.
QUIET_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"transformers .* is not tested with current version of modelopt",
    r"tp_group is None",
    r"full scope is deprecated",  # TransformerConfig's own default, not something we set
    # torch deprecations raised inside megatron-core's dist-checkpoint reader
    r"`load_state_dict` is deprecated and will be removed",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    # ModelOpt: the output-layer sharded-state fix it means is applied by the toolkit's patch
    # registry (gpt_output_layer_extra_state); the toolkit's modules need no parallel_state of
    # their own (TP groups come from megatron); a torch notice about its own state serializer
    r"GPTModel.sharded_state_dict is not the version ModelOpt patches",
    r"Distributed training is initialized but no parallel_state is set",
    r"The given buffer is not writable",
)


def quiet_upstream_warnings() -> None:
    for msg in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)


quiet_upstream_warnings()


def run_entry(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """:func:`~post_training.utils.run_main` that also tears down the runtime the entry started
    (a runtime that existed before the call, a test's or a notebook's, is not ours)."""
    had_runtime = dist.is_available() and dist.is_initialized()

    def teardown() -> None:
        # Only entries that set up a runtime have one; the checkpoint tools never import it.
        if not had_runtime and "post_training.runtime" in sys.modules:
            try:
                sys.modules["post_training.runtime"].destroy_runtime()
            except Exception:
                pass

    run_main(main, argv, on_exit=teardown)
