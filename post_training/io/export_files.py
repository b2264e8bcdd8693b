"""Filesystem side of exports: HF shard layout, staging directory, atomic replacement.

ModelOpt's exporter writes one ``model-<layer>-of-<layers>.safetensors`` per decoder layer, a
``.json`` index part beside each, and ``model.safetensors.index.json``; it has no shard-size
option. :func:`repack_shards` turns that into Hugging Face's layout for a maximum shard size.
An export is written into a hidden sibling ``.<name>.tmp-<id>`` and renamed into place last,
so a failed or killed export never leaves a partial directory under the requested name.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from post_training.io.layout import fsync_tree
from post_training.utils import UsageError

INDEX = "model.safetensors.index.json"
# Weight files of other formats that ModelOpt copies from the source directory with the tokenizer.
_FOREIGN_WEIGHTS = re.compile(r".*\.(bin|pt|pth|gguf|h5|msgpack|ckpt|onnx)$|.*\.bin\.index\.json$")


def new_staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out``; debris of killed exports to ``out`` is removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging



def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor, from the safetensors header (no tensor is read)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def repack_shards(root: Path, max_bytes: int) -> tuple[int, int]:
    """ModelOpt's one-file-per-layer output -> HF's layout: shards of at most ``max_bytes`` in
    layer order (a larger tensor gets a shard of its own), an index when there are several.
    Tensors are copied as they are; one shard is in memory at a time. Returns (shards, bytes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = json.loads((root / INDEX).read_text())["weight_map"]
    layers = root / ".modelopt_layers"
    layers.mkdir()
    for f in sorted(set(weight_map.values())):
        os.replace(root / f, layers / f)
        (root / f).with_suffix(".json").unlink(missing_ok=True)  # ModelOpt's per-layer index part
    (root / INDEX).unlink()
    plan: list[list[tuple[str, str]]] = [[]]
    size = total = 0
    for f in sorted(set(weight_map.values())):
        sizes = _tensor_bytes(layers / f)
        for key in (k for k in weight_map if weight_map[k] == f):
            if plan[-1] and size + sizes[key] > max_bytes:
                plan.append([])
                size = 0
            plan[-1].append((key, f))
            size += sizes[key]
            total += sizes[key]
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    new_map = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(layers / f, framework="pt"))
                   for f in set(weight_map.values())}
        for name, entries in zip(names, plan):
            save_file({k: handles[f].get_tensor(k) for k, f in entries}, root / name, metadata={"format": "pt"})
            new_map.update({k: name for k, _ in entries})
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
        (root / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(layers)
    return len(plan), total


def finalize(root: Path, dtype: torch.dtype, max_bytes: int) -> tuple[int, int]:
    """Repack the shards, drop weight files of other formats copied from the source, make
    config.json state the exported dtype, give files the usual permissions, fsync."""
    shards = repack_shards(root, max_bytes)
    for p in root.iterdir():
        if p.is_file() and _FOREIGN_WEIGHTS.fullmatch(p.name):
            p.unlink()
    cfg_path = root / "config.json"
    cfg = json.loads(cfg_path.read_text())
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    umask = os.umask(0o022)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for p in root.iterdir():
        if p.is_file():
            p.chmod(0o666 & ~umask)  # safetensors writes 0600: a server under another uid could not read it
    fsync_tree(root)
    return shards


def commit(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished export into place; an existing one is swapped out, then removed."""
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise UsageError(f"export dir {out} is not empty (pass --overwrite to replace it)")
        old = out.parent / f".{out.name}.tmp-old-{uuid.uuid4().hex[:12]}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


