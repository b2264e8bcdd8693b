"""Recognise checkpoint layouts without running code from the files.

:func:`detect` says which kind of checkpoint a path is and which files belong to it;
:func:`file_role` says what each file is for. The readers of headers and records live in
:mod:`post_training.checkpointing.tools.inspect_readers`; ``inspect_cmd`` turns both into a report.
"""
from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from post_training.io import layout as cio
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
