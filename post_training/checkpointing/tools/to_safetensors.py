"""``to-safetensors IN OUT``: a ``.pt/.bin/.pth`` state dict (or an HF directory of them) ->
safetensors, without running pickle code from the file unless ``--trust-pickle``.

The state dict is found inside the usual wrappers (``state_dict``, ``model``, ``module``, nested
dicts, flattened with dotted names); entries that are not tensors are skipped and listed.
safetensors refuses tensors that share storage: an HF directory whose config ties the word
embeddings drops the tied ``lm_head.weight`` (transformers re-ties it on load, as its own
``save_pretrained`` does); any other sharing is written as separate copies and recorded in the
shard metadata under ``shared`` (``{copy: original}``), so every key still loads with any reader.
Every written file is read back with safetensors' reader and compared bitwise with what was meant
to be written, then listed in ``SHA256SUMS``.

Shards are written by :mod:`post_training.io.safetensors_io`; the state-dict helpers here are
shared with ``merge-lora``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from post_training.io.formats import DTYPES
from post_training.io.safetensors_io import INDEX
from post_training.utils import UsageError

if TYPE_CHECKING:
    import torch

BIN_INDEX = "pytorch_model.bin.index.json"
# Wrapper keys of training checkpoints (Lightning, plain training loops, Megatron, DeepSpeed).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_TORCH_SUFFIXES = (".pt", ".bin", ".pth")
# torch.save's legacy (pre-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
# Input-embedding names an untied/tied ``lm_head.weight`` pairs with (Llama/Qwen, GPT-2, BLOOM, NeoX).
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="a .pt/.bin/.pth file, or an HF directory with "
                        "pytorch_model.bin or pytorch_model-*.bin + pytorch_model.bin.index.json")
    parser.add_argument("output", metavar="OUT", help="output directory (gets model.safetensors or shards "
                        "+ index, the HF directory's other files, SHA256SUMS); for a file IN, a path "
                        "ending in .safetensors writes that one file and a .sha256 beside it")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow pickle globals beyond tensors (can run code from the file)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                        help="cast floating-point tensors (default: keep each tensor's dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output file (default 5GB)")


def read_json(path: Path) -> dict:
    """A JSON object file, or one ``error:`` line naming it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return data


def read_config(d: Path) -> dict:
    """``config.json`` of a directory, or {} when it has none."""
    return read_json(d / "config.json") if (d / "config.json").is_file() else {}


def untie_shared(sd: dict[str, torch.Tensor], drop_tied_lm_head: bool) -> tuple[dict, list[str], dict[str, str]]:
    """Make a state dict savable as safetensors. Among tensors sharing storage, the first keeps
    it and the others are cloned (exact aliases are returned as ``{copy: original}``); a tied
    ``lm_head.weight`` is dropped instead when the model's config ties it. Returns
    (state dict, dropped names, aliases)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        storage = t.untyped_storage()
        if storage.nbytes():
            groups.setdefault((t.device.type, storage.data_ptr()), []).append(name)

    def view(n: str) -> tuple:
        t = sd[n]
        return t.storage_offset(), tuple(t.shape), t.stride(), t.dtype

    dropped, aliases, cloned = [], {}, set()
    for names in (g for g in groups.values() if len(g) > 1):
        if drop_tied_lm_head and "lm_head.weight" in names and \
                any(view(n) == view("lm_head.weight") for n in names if n != "lm_head.weight"):
            names.remove("lm_head.weight")
            dropped.append("lm_head.weight")
        for n in names[1:]:
            cloned.add(n)
            if view(n) == view(names[0]):
                aliases[n] = names[0]
    # Non-identical views of one buffer (packed/flat parameters) only need their own storage.
    out = {n: (t.clone() if n in cloned else t) for n, t in sd.items() if n not in dropped}
    return out, dropped, aliases


def find_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a loaded torch file, flattened with dotted names, and the skipped entries.

    Descends into a wrapper key (``state_dict``, ``model_state_dict``, ``model``, ``module``) when
    the level holds no tensor itself, so optimizer state and ``args`` beside it are left out."""
    import torch

    skipped: list[str] = []
    prefix = ""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if _has_tensor(obj.get(k))), None)
        if key is None:
            break
        skipped += [f"{prefix}{k} ({type(v).__name__})" for k, v in obj.items() if k != key]
        obj, prefix = obj[key], f"{prefix}{key}."
    flat: dict[str, torch.Tensor] = {}
    _flatten(obj, "", flat, skipped)
    return flat, skipped


def _has_tensor(obj: Any, depth: int = 0) -> bool:
    import torch

    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return True
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return depth < 8 and any(_has_tensor(v, depth + 1) for v in values)


def _flatten(obj: Any, name: str, flat: dict, skipped: list[str]) -> None:
    import torch

    if isinstance(obj, torch.nn.Module):  # only reachable with --trust-pickle
        obj = obj.state_dict()
    if isinstance(obj, torch.Tensor):
        plain = type(obj) in (torch.Tensor, torch.nn.Parameter)
        if obj.layout != torch.strided or obj.is_quantized or not plain:
            raise UsageError(f"tensor {name or '<root>'} ({type(obj).__name__}, {obj.layout}, {obj.dtype}) "
                             "cannot be stored in safetensors; convert it to a dense tensor first")
        if name in flat:
            raise UsageError(f"two entries flatten to the same name {name}")
        flat[name] = obj.detach()
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{name}.{k}" if name else str(k), flat, skipped)
    elif isinstance(obj, (list, tuple)) and _has_tensor(obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{name}.{i}" if name else str(i), flat, skipped)
    else:
        skipped.append(f"{name or '<root>'} ({type(obj).__name__})")


def index_files(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, in first-use order; all must exist."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UsageError(f"{index} has no weight_map")
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"{index} names missing shard(s): {', '.join(missing)}")
    return files


def hf_torch_weights(d: Path) -> list[Path]:
    """The pickle weight files of an HF directory, in index order."""
    index = d / BIN_INDEX
    if index.is_file():
        return index_files(index)
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    shards = sorted(d.glob("pytorch_model-*.bin"))
    if shards:
        return shards
    if (d / "model.safetensors").is_file() or (d / INDEX).is_file():
        raise UsageError(f"{d} already holds safetensors weights and no pytorch_model*.bin")
    torch_files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in _TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return torch_files
    seen = ", ".join(p.name for p in torch_files) or "none"
    raise UsageError(f"{d}: no pytorch_model.bin, pytorch_model-*.bin or single .pt/.bin/.pth file "
                     f"(torch files there: {seen}); give the weight file itself as IN")


def load_torch_file(path: Path, trust_pickle: bool = False) -> Any:
    """``safe_torch_load`` after checking the file is a torch file at all (zip or legacy format),
    so a stray text or binary file is named as such rather than as a pickle needing globals."""
    import zipfile

    from post_training.checkpointing.tools.safe_load import safe_torch_load

    if path.is_file() and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(len(_LEGACY_MAGIC)) != _LEGACY_MAGIC:
                raise UsageError(f"{path} is not a readable torch file (neither torch.save's zip nor legacy format)")
    return safe_torch_load(path, trust_pickle=trust_pickle)


def _short_list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def run(args: argparse.Namespace) -> int:
    from post_training.checkpointing.tools.safe_load import write_sha256sums
    from post_training.io.atomic import staged_dir
    from post_training.io.formats import parse_size, torch_dtype
    from post_training.io.hf_files import copy_aux_files, update_config

    src, out = Path(args.input), Path(args.output)
    if not src.exists():
        raise UsageError(f"{src}: no such file or directory")
    if out.resolve() == src.resolve():
        raise UsageError("OUT must not be IN itself")
    dtype, max_bytes = torch_dtype(args.dtype), parse_size(args.max_shard_size)
    if src.is_dir():
        files, cfg = hf_torch_weights(src), read_config(src)
    else:
        files, cfg = [src], {}
    # transformers re-ties lm_head to the input embedding when the config says so (its default).
    drop_tied = bool(cfg) and cfg.get("tie_word_embeddings", True) is not False

    if out.suffix == ".safetensors" and not out.is_dir():
        if src.is_dir():
            raise UsageError(f"IN {src} is a directory: give an output directory, not a .safetensors file")
        report = _convert_to_file(files, out, dtype, args, drop_tied)
    else:
        with staged_dir(out, args.overwrite) as root:
            report = _convert(files, root, dtype, max_bytes, args.trust_pickle, drop_tied)
            if src.is_dir():
                report.append(("left out", copy_aux_files(src, root)))
                update_config(root, dtype)
            write_sha256sums(root)
    for what, items in report:
        if items:
            print(f"{what}: {_short_list(items)}")
    print(f"wrote {out}")
    return 0


def _convert_to_file(files: list[Path], out: Path, dtype: torch.dtype | None, args: argparse.Namespace,
                     drop_tied: bool) -> list[tuple[str, list[str]]]:
    """One ``.safetensors`` file (no sharding) and ``<out>.sha256`` beside it, renamed in last."""
    from post_training.io.atomic import check_output_file, commit, new_staging_dir, usual_permissions
    from post_training.io.formats import sha256_file

    sums = out.with_name(out.name + ".sha256")
    tmp = new_staging_dir(check_output_file(out, args.overwrite))
    try:
        report = _convert(files, tmp, dtype, 1 << 62, args.trust_pickle, drop_tied)
        (tmp / "sha256").write_text(f"{sha256_file(tmp / 'model.safetensors')}  {out.name}\n")
        usual_permissions(tmp)
        commit(tmp / "model.safetensors", out)
        commit(tmp / "sha256", sums)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _convert(files: list[Path], root: Path, dtype: torch.dtype | None, max_bytes: int,
             trust_pickle: bool, drop_tied: bool) -> list[tuple[str, list[str]]]:
    """Stream the files into safetensors shards under ``root``; returns report lines."""
    skipped_all, dropped_all, shared_all, seen = [], [], [], set()
    from post_training.io.safetensors_io import ShardWriter

    writer = ShardWriter(root, max_bytes)
    for f in files:  # one source file at a time (memory-mapped when it is zip-format)
        sd, skipped = find_state_dict(load_torch_file(f, trust_pickle))
        if not sd:
            raise UsageError(f"{f}: no tensors found" + (f" (entries: {_short_list(skipped)})" if skipped else ""))
        dup = seen.intersection(sd)
        if dup:
            raise UsageError(f"{f}: tensor {sorted(dup)[0]} is also in an earlier file")
        seen.update(sd)
        sd, dropped, aliases = untie_shared(sd, drop_tied)
        for name, t in sd.items():
            writer.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t, aliases.get(name))
        skipped_all += [f"{f.name}:{s}" if len(files) > 1 else s for s in skipped]
        dropped_all += dropped
        shared_all += [f"{k} = {v}" for k, v in aliases.items()]
    names = writer.finish()
    print(f"{len(seen) - len(dropped_all)} tensors, {writer.total_bytes / 1e6:.1f} MB in {len(names)} file(s); "
          "every tensor read back and compared with its source")
    return [("skipped (not tensors)", skipped_all),
            ("dropped tied (config ties it to the input embedding)", dropped_all),
            ("stored as copies of shared tensors (recorded in the metadata as 'shared')", shared_all)]
