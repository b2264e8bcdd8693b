"""Recognise checkpoint layouts and read their metadata without running code from the files.

Everything here reads headers and records only: safetensors headers (8-byte length + JSON),
torch.distributed.checkpoint ``.metadata`` through an unpickler that admits nothing but DCP's own
dataclasses, GGUF through ``gguf.GGUFReader``, json, and ``weights_only`` torch loads. A file
whose pickle asks for other globals is reported by name, never loaded.

:func:`detect` says which kind of checkpoint a path is and which files belong to it;
:func:`file_role` says what each file is for. ``inspect_cmd`` turns that into a report.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from post_training import checkpoint_io as cio
from post_training.utils import UsageError

KINDS: dict[str, str] = {
    "toolkit-dist": "post_training dist checkpoint (megatron-core torch_dist, Megatron-LM layout)",
    "megatron-dist": "Megatron-LM dist checkpoint (megatron-core torch_dist)",
    "megatron-legacy": "Megatron-LM legacy checkpoint (mp_rank_*/model_optim_rng.pt)",
    "torch-dcp": "torch.distributed.checkpoint directory",
    "hf-model": "Hugging Face model directory",
    "peft-adapter": "PEFT adapter directory",
    "hf-trainer": "Hugging Face Trainer checkpoint",
    "deepspeed": "DeepSpeed checkpoint",
    "gguf": "GGUF file",
    "safetensors-file": "single safetensors file",
    "torch-file": "single torch pickle file",
}

# role -> (needed for inference, needed to resume training, safe to edit by hand)
ROLE_FLAGS: dict[str, tuple[bool, bool, bool]] = {
    "weights": (True, True, False),
    "weights index": (True, True, False),
    "adapter weights": (True, True, False),
    "adapter config": (True, True, False),
    "config": (True, True, False),
    "tokenizer": (True, False, False),
    "generation behaviour": (True, False, True),
    "chat template": (True, False, True),
    "optimizer state": (False, True, False),
    "scheduler": (False, True, False),
    "RNG": (False, True, False),
    "trainer state": (False, True, False),
    "training args": (False, False, False),
    "pointer": (True, True, False),
    "tool script": (False, False, True),
    "metadata": (True, True, False),
    "modelopt state": (True, True, False),
    "docs": (False, False, True),
    "other": (False, False, False),
}

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model",
                   "sentencepiece.bpe.model", "tiktoken.model"}
_MP_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
DS_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
DS_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
DS_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
DS_LAYER = re.compile(r"^layer_(\d+)-model(?:_(\d+)-model)?_states\.pt$")
DISTCP = re.compile(r"^__(\d+)_(\d+)\.distcp$")
_TRAINER_CKPT = re.compile(r"^checkpoint-(\d+)$")
_DS_TAG = re.compile(r"^global_step(\d+)$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


@dataclass
class Layout:
    """What :func:`detect` found: the kind, the directory holding the checkpoint proper (an
    iteration / ``checkpoint-N`` / ``global_stepN`` dir, or the file itself) and its files."""

    kind: str
    root: Path
    main: Path
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    deepspeed_dir: Path | None = None  # ZeRO tag dir (also inside an HF Trainer checkpoint)

    @property
    def description(self) -> str:
        return KINDS[self.kind]


# ----------------------------------------------------------------------------- detection
def detect(path: str | Path) -> Layout:
    """Recognise the checkpoint at ``path`` or raise a UsageError saying what was found."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    if p.is_file():
        return Layout(_file_kind(p), p, p, [p])
    return _detect_dir(p)


def _file_kind(p: Path) -> str:
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or p.suffix == ".gguf":
        return "gguf"
    if p.suffix == ".safetensors":
        return "safetensors-file"
    if zipfile.is_zipfile(p) or magic[:1] == b"\x80" or p.suffix in _WEIGHT_SUFFIXES:
        return "torch-file"
    raise UsageError(f"no checkpoint recognised in {p}: not a safetensors, GGUF or torch file")


def _detect_dir(d: Path) -> Layout:
    names = {c.name for c in d.iterdir()}
    notes = [f"leftover staging dir {n} (an interrupted save; safe to delete)"
             for n in sorted(names) if n.startswith(".") and ".tmp-" in n]
    if cio.TRACKER in names:
        it = cio.read_tracker(d)  # a dangling or garbage tracker is a clear UsageError already
        kind = _megatron_kind(it)
        extra = [d / cio.TRACKER] + _tree(d / cio.HF_CONFIG_DIR)
        others = sorted(n for n in names if (n.startswith("iter_") or n == "release") and n != it.name)
        if others:
            notes.append(f"other iterations not inspected: {', '.join(others)}")
        return Layout(kind, d, it, extra + _tree(it), notes)
    if cio.is_dist_checkpoint_dir(d) or _mp_rank_dirs(d):
        kind = _megatron_kind(d)
        hf = d.parent / cio.HF_CONFIG_DIR  # our save root keeps config + tokenizer beside iterations
        notes.append(f"given an iteration directory; {cio.TRACKER} in the parent names the one to resume")
        return Layout(kind, d, d, _tree(hf) + _tree(d), notes)
    iters = sorted(n for n in names if re.match(r"^iter_\d{7}$", n) or n == "release")
    if iters:
        it = d / iters[-1]
        notes.append(f"no {cio.TRACKER}: Megatron resumes from a root only through it; inspected {it.name}")
        return Layout(_megatron_kind(it), d, it, _tree(d / cio.HF_CONFIG_DIR) + _tree(it), notes)
    ds = _deepspeed_dir(d, names, notes)
    if "trainer_state.json" in names:
        return Layout("hf-trainer", d, d, _tree(d), notes, deepspeed_dir=ds)
    ckpts = sorted((int(m.group(1)), n) for n in names if (m := _TRAINER_CKPT.match(n)) and (d / n).is_dir())
    has_weights = any(n.endswith(_WEIGHT_SUFFIXES) for n in names)
    if ckpts and not has_weights:
        last = d / ckpts[-1][1]
        if len(ckpts) > 1:
            notes.append(f"other Trainer checkpoints not inspected: {', '.join(n for _, n in ckpts[:-1])}")
        sub = _detect_dir(last)
        sub.root, sub.notes = d, notes + sub.notes
        return sub
    if ds is not None:
        files = _tree(d) if ds == d else _tree(d, skip_dirs=True) + _tree(ds)
        return Layout("deepspeed", d, ds, files, notes, deepspeed_dir=ds)
    if ckpts:
        notes.append(f"Trainer checkpoints beside the model, not inspected: {', '.join(n for _, n in ckpts)}")
    if "adapter_config.json" in names:
        return Layout("peft-adapter", d, d, _tree(d, skip_dirs=True), notes)
    hf_weights = any(n.endswith((".safetensors", ".index.json")) or re.match(r"^pytorch_model.*\.bin$", n)
                     for n in names)
    if hf_weights or ("config.json" in names and has_weights):
        return Layout("hf-model", d, d, _tree(d, skip_dirs=True), notes)
    if ".metadata" in names and any(DISTCP.match(n) for n in names):
        return Layout("torch-dcp", d, d, _tree(d), notes)
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if ggufs:
        if len(ggufs) > 1:
            notes.append(f"{len(ggufs)} GGUF files; inspected {ggufs[0]} (name one to inspect another)")
        return Layout("gguf", d, d / ggufs[0], [d / ggufs[0]], notes)
    loose = sorted(n for n in names if n.endswith(_WEIGHT_SUFFIXES) and (d / n).is_file())
    if len(loose) == 1:  # one bare weights file and nothing to say how to use it
        return Layout(_file_kind(d / loose[0]), d, d / loose[0], [d / loose[0]], notes)
    found = sorted(str(p.relative_to(d)) for p in _tree(d))
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    raise UsageError(f"no checkpoint recognised in {d}: found {len(found)} files"
                     + (f" ({shown})" if found else ""))


def _megatron_kind(it: Path) -> str:
    if cio.is_dist_checkpoint_dir(it):
        return "toolkit-dist" if (it / cio.META).is_file() else "megatron-dist"
    if _mp_rank_dirs(it):
        return "megatron-legacy"
    found = sorted(p.name for p in it.iterdir()) if it.is_dir() else []
    raise UsageError(f"no checkpoint recognised in {it}: no metadata.json + common.pt and no mp_rank_* "
                     f"dirs (found {len(found)} entries{': ' + ', '.join(found[:5]) if found else ''})")


def _deepspeed_dir(d: Path, names: set[str], notes: list[str]) -> Path | None:
    """The ZeRO tag dir: named by ``latest``, else the newest ``global_step*``, else ``d`` itself."""
    if any(DS_OPTIM.match(n) or DS_MODEL.match(n) or DS_ZERO3_MODEL.match(n) for n in names):
        return d
    if "latest" in names and (d / "latest").is_file():
        tag = (d / "latest").read_text().strip()
        if (d / tag).is_dir():
            return d / tag
        notes.append(f"'latest' names {tag!r}, which is not a directory here")
    tags = sorted((int(m.group(1)), n) for n in names if (m := _DS_TAG.match(n)) and (d / n).is_dir())
    if tags:
        if "latest" not in names:
            notes.append("no 'latest' file: DeepSpeed's load_checkpoint needs an explicit tag")
        return d / tags[-1][1]
    return None


def _mp_rank_dirs(d: Path) -> list[Path]:
    return sorted(c for c in d.iterdir() if c.is_dir() and _MP_RANK_DIR.match(c.name)) if d.is_dir() else []


def mp_rank_position(name: str) -> tuple[int, int, int] | None:
    """``mp_rank_TT[_PPP[_EEE]]`` -> (tp rank, pp rank, ep rank)."""
    m = _MP_RANK_DIR.match(name)
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)) if m else None


def _tree(d: Path, skip_dirs: bool = False) -> list[Path]:
    """Files under ``d`` (hidden files like DCP's ``.metadata`` included; hidden dirs such as
    staging leftovers or ``.cache`` skipped)."""
    if not d.is_dir():
        return []
    out = []
    for c in sorted(d.iterdir()):
        if c.is_file():
            out.append(c)
        elif c.is_dir() and not skip_dirs and not c.name.startswith("."):
            out.extend(_tree(c))
    return out


# ----------------------------------------------------------------------------- file roles
def file_role(path: Path, zero_stage: int | None = None) -> str:
    """What a file is for, from its name (and its parent dirs)."""
    n, parts = path.name, path.parts
    if "modelopt_state" in parts:
        return "modelopt state"
    if n == cio.TRACKER or (n == "latest" and not path.suffix):
        return "pointer"
    if n in (".metadata", "metadata.json", "common.pt", cio.META, "SOURCE.json", "SHA256SUMS"):
        return "metadata"
    if n in ("config.json", "hf_quant_config.json", "quantization_config.json", "preprocessor_config.json",
             "processor_config.json", "params.json"):
        return "config"
    if n == "generation_config.json":
        return "generation behaviour"
    if n.startswith("chat_template") or "additional_chat_templates" in parts:
        return "chat template"
    if n in TOKENIZER_FILES:
        return "tokenizer"
    if n.startswith("adapter_model"):
        return "adapter weights"
    if n == "adapter_config.json":
        return "adapter config"
    if n.endswith(".index.json"):
        return "weights index"
    if n == "trainer_state.json":
        return "trainer state"
    if n == "training_args.bin":
        return "training args"
    if n in ("optimizer.pt", "optimizer.bin", "scaler.pt", "distrib_optim.pt") or DS_OPTIM.match(n):
        return "optimizer state"
    if n in ("scheduler.pt", "scheduler.bin"):
        return "scheduler"
    if n.startswith("rng_state") and n.endswith((".pth", ".pt")):
        return "RNG"
    if n == "zero_to_fp32.py" or n.endswith((".py", ".sh")):
        return "tool script"
    if n.endswith(".md"):
        return "docs"
    if n.endswith(_WEIGHT_SUFFIXES + (".distcp",)):
        return "weights"
    return "other"


# ----------------------------------------------------------------------------- readers
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
    from post_training.ckpt.safe_load import unsafe_globals

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
        with torch.serialization.safe_globals([argparse.Namespace]):
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
