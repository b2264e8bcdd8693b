"""Sub-command dispatcher for ``python -m post_training.ckpt``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
they are imported lazily so ``inspect`` never pays for megatron-core or transformers imports.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from post_training.utils import run_main

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("post_training.checkpointing.tools.inspect_cmd", "explain a checkpoint directory or file"),
    "consolidate": ("post_training.checkpointing.tools.consolidate", "sharded checkpoint -> one HF safetensors model"),
    "merge-lora": ("post_training.checkpointing.tools.merge_lora", "fold LoRA into the base: PEFT adapter + HF base, or a toolkit LoRA checkpoint (any TP/PP)"),
    "to-safetensors": ("post_training.checkpointing.tools.to_safetensors", "convert a .pt/.bin state dict safely"),
    "to-gguf": ("post_training.checkpointing.tools.to_gguf", "write a GGUF file from a Llama-family checkpoint"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one ``error:`` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m post_training.ckpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Registration is cheap: modules keep heavy imports inside run().
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    return importlib.import_module(args._module).run(args)


def cli_main() -> None:
    run_main(main)
