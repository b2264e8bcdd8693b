"""Read checkpoint metadata without running code from the files.

Everything here reads headers and records only: safetensors headers (8-byte length + JSON),
torch.distributed.checkpoint ``.metadata`` through an unpickler that admits nothing but DCP's own
dataclasses, GGUF through ``gguf.GGUFReader``, and ``weights_only`` torch loads. A file whose
pickle asks for other globals is reported by name, never loaded.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

from post_training.utils import UsageError

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
              "U64": "uint64", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2"}


def safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``({tensor: {"dtype", "shape"}}, __metadata__)`` from the header alone; truncation of the
    header or of the data it describes is a UsageError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise UsageError(f"{path}: truncated safetensors header (declares {n} bytes, "
                             f"{size - 8} follow)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        meta = header.pop("__metadata__", None) or {}
        tensors = {k: {"dtype": _ST_DTYPES.get(v["dtype"], v["dtype"].lower()), "shape": list(v["shape"]),
                       "end": int(v["data_offsets"][1])} for k, v in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UsageError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    end = max((t.pop("end") for t in tensors.values()), default=0)
    if 8 + n + end > size:
        raise UsageError(f"{path}: truncated safetensors file (tensor data ends at byte {8 + n + end}, "
                         f"file has {size})")
    return tensors, meta


def pickle_check(path: Path) -> tuple[str, list[str]]:
    """How loading a torch pickle file behaves: ``weights_only`` (no code runs), ``needs_globals``
    (with the globals it names), ``legacy_unchecked`` (pre-zip format), or ``none`` (no pickle)."""
    from post_training.checkpointing.tools.safe_load import unsafe_globals

    with open(path, "rb") as f:
        magic = f.read(2)
    if not zipfile.is_zipfile(path):
        if magic == b"PK":
            raise UsageError(f"{path}: truncated or corrupt torch file (its zip directory is unreadable)")
        return ("legacy_unchecked" if magic[:1] == b"\x80" else "none"), []
    names = sorted(unsafe_globals(path))
    return ("needs_globals", names) if names else ("weights_only", [])


# Inspect-only allowance: an argparse.Namespace is a plain attribute bag (the weights_only
# unpickler fills its __dict__), and Megatron stores its ``args`` in one.
_INSPECT_SAFE = {"argparse.Namespace"}


def peek_torch(path: Path) -> Any | None:
    """A ``weights_only`` (memory-mapped) load of a zip-format torch file, or None when the file
    needs globals beyond ``argparse.Namespace`` or is in the legacy format (never unpickled)."""
    import argparse

    import torch

    kind, names = pickle_check(path)
    if kind == "legacy_unchecked" or not set(names) <= _INSPECT_SAFE:
        return None
    try:
        from post_training.checkpointing.tools.safe_load import only_globals

        with only_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unreadable: say so in the report rather than fail the whole inspect
        raise UsageError(f"{path}: not a readable torch file ({str(e).splitlines()[0][:200]})") from None


def tensors_in(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists to ``{dotted.name: tensor}``."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_in(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_in(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


_DCP_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Admits DCP's dataclasses and enums, ``torch.Size`` and dtypes; refuses everything else.

    torch itself reads ``.metadata`` with a plain ``pickle.load``; this is the restricted reader
    of the pickle docs' "Restricting Globals" recipe, so a tampered file is refused, not run."""

    def __init__(self, f) -> None:
        super().__init__(f)
        self.seen: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        ok = False
        if module.startswith(_DCP_MODULES):  # import only modules we trust, then check the object
            obj = super().find_class(module, name)
            ok = dataclasses.is_dataclass(obj) or (isinstance(obj, type) and issubclass(obj, enum.Enum))
        elif module == "torch":
            import torch

            obj = getattr(torch, name, None)
            ok = name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        elif full in ("torch.serialization._get_layout", "collections.OrderedDict"):
            obj, ok = super().find_class(module, name), True
        if not ok:
            raise pickle.UnpicklingError(full)
        self.seen.add(full)
        return obj


def dcp_metadata(d: Path) -> tuple[Any, list[str]]:
    """The DCP ``Metadata`` of ``d`` (global shapes, dtypes, storage) and the globals it used."""
    p = d / ".metadata"
    try:
        with open(p, "rb") as f:
            u = _DcpMetadataUnpickler(f)
            return u.load(), sorted(u.seen)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{p}: DCP metadata asks for pickle global {e}, which DCP metadata never "
                         "needs; refusing to read it (loading it could run code)") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UsageError(f"{p}: truncated or corrupt DCP metadata ({type(e).__name__})") from None


def dcp_bytes_globals(d: Path, md: Any) -> dict[str, tuple[str, list[str]]]:
    """Per ``.distcp`` file, how its non-tensor items (``torch.save`` blobs that DCP's load
    planner reads with ``weights_only=False``) would load: (pickle kind, globals)."""
    import torch

    out: dict[str, tuple[str, list[str]]] = {}
    for idx, info in (md.storage_data or {}).items():
        rel = info.relative_path
        if not (d / rel).is_file():
            out[rel] = ("missing", [])
        out.setdefault(rel, ("none", []))
        if out[rel][0] == "missing":
            continue
        if not type(md.state_dict_metadata.get(idx.fqn)).__name__ == "BytesStorageMetadata":
            continue
        kind, names = out[rel]
        if getattr(info, "transform_descriptors", None):
            out[rel] = ("legacy_unchecked", names)  # compressed blob: not opened here
            continue
        with open(d / rel, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        if not blob.startswith(b"PK"):
            out[rel] = ("legacy_unchecked", names)
            continue
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob))
        except Exception:
            raise UsageError(f"{d / rel}: truncated or corrupt (item {idx.fqn} unreadable)") from None
        names = sorted(set(names) | set(found))
        if kind != "legacy_unchecked":
            kind = "needs_globals" if names else "weights_only"
        out[rel] = (kind, names)
    return out


def gguf_info(path: Path) -> dict[str, Any]:
    """Metadata fields and tensor list of a GGUF file (``gguf.GGUFReader`` memory-maps it)."""
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(path))
        fields = {}
        for k, f in r.fields.items():
            if k.startswith("GGUF.") or k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                               "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
                fields[k] = len(f.data) if not k.startswith("GGUF.") else f.contents()
                continue
            fields[k] = f.contents()
        tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(s) for s in t.shape],
                    "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes)} for t in r.tensors]
    except Exception as e:
        raise UsageError(f"{path}: not a readable GGUF file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'truncated?'})") from None
    return {"fields": fields, "tensors": tensors}
