"""Files of Hugging Face model directories the toolkit writes: side files copied from a source
(config, tokenizer, templates), the dtype config.json states, and the finish of an export.

ModelOpt's exporter writes one ``model-<layer>-of-<layers>.safetensors`` per decoder layer, a
``.json`` index part beside each, and ``model.safetensors.index.json``; it has no shard-size
option. :func:`repack_shards` turns that into Hugging Face's layout for a maximum shard size.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from post_training.io.atomic import usual_permissions
from post_training.io.formats import dtype_name, is_weight_file
from post_training.io.safetensors_io import INDEX, ST_DTYPES, ShardWriter, read_header
from post_training.utils import UsageError


def copy_aux_files(src: Path, dst: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Copy a model directory's top-level side files (config, tokenizer, templates...) from
    ``src`` to ``dst``. Returns the files left out: weights of any format and their indexes,
    the source's SHA256SUMS (it lists the source's weights) and ``exclude``; hidden files too."""
    left_out = []
    for p in sorted(Path(src).iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if is_weight_file(p.name) or p.name == "SHA256SUMS" or p.name in exclude:
            left_out.append(p.name)
        else:
            shutil.copy2(p, dst / p.name)
    return left_out


def update_config(root: Path, dtype: torch.dtype | None, **changes) -> None:
    """State ``dtype`` (``dtype``, and the older ``torch_dtype`` when present) and other changes
    in ``root/config.json`` when there is one."""
    path = root / "config.json"
    if not path.is_file() or (dtype is None and not changes):
        return
    cfg = json.loads(path.read_text())
    if dtype is not None:
        cfg["dtype"] = dtype_name(dtype)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype_name(dtype)
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def repack_shards(root: Path, max_bytes: int) -> tuple[list[str], int]:
    """ModelOpt's one-file-per-layer output -> HF's layout (:mod:`.safetensors_io`), tensors in
    layer order and copied as they are, one at a time. Returns (shard files, tensor bytes)."""
    from safetensors import safe_open

    weight_map: dict[str, str] = json.loads((root / INDEX).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    layers = root / ".modelopt_layers"
    layers.mkdir()
    for f in files:
        os.replace(root / f, layers / f)
        (root / f).with_suffix(".json").unlink(missing_ok=True)  # ModelOpt's per-layer index part
    (root / INDEX).unlink()
    by_code = {code: dt for dt, code in ST_DTYPES.items()}
    specs = []
    for f in files:
        header = read_header(layers / f)
        for key in (k for k in weight_map if weight_map[k] == f):
            if header[key]["dtype"] not in by_code:
                raise UsageError(f"exported tensor {key} has dtype {header[key]['dtype']}, which cannot be repacked")
            specs.append((key, tuple(header[key]["shape"]), by_code[header[key]["dtype"]]))
    writer = ShardWriter(root, max_bytes)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(layers / f, framework="pt")) for f in files}
        writer.stream(specs, ((k, handles[weight_map[k]].get_tensor(k)) for k, _, _ in specs))
    names = writer.finish()
    shutil.rmtree(layers)
    return names, writer.total_bytes


def finalize(root: Path, dtype: torch.dtype, max_bytes: int) -> tuple[int, int]:
    """Finish a ModelOpt export in ``root``: repack the shards, drop weight files of other
    formats copied from the source with the tokenizer, make config.json state the exported
    dtype, give files the usual permissions. Returns (shards, tensor bytes)."""
    names, total = repack_shards(root, max_bytes)
    for p in root.iterdir():
        if p.is_file() and is_weight_file(p.name) and p.name not in (*names, INDEX):
            p.unlink()
    update_config(root, dtype)
    usual_permissions(root)
    return len(names), total
