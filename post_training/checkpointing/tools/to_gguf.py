"""``to-gguf CKPT OUT``: write a llama.cpp GGUF file from a Llama-family checkpoint.

CKPT is a Hugging Face model directory (safetensors, sharded or not) of a Llama, Mistral, Qwen2
or Qwen3 causal LM, or a toolkit (megatron dist) checkpoint, which is first consolidated into a
temporary HF directory. Tensors are streamed one at a time from the safetensors files straight
into the output (tensor infos first, then data), so the model is never held in memory whole.
Conventions follow llama.cpp's ``convert_hf_to_gguf.py``: GGUF tensor names from gguf-py's
name map, Q/K rows of Llama permuted into llama.cpp's rope layout, 1-D tensors kept F32, no
``output.weight`` when the embeddings are tied, a byte-level BPE tokenizer (``gguf_tokenizer``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from post_training.utils import UsageError

# HF architecture -> (gguf-py arch name, permute Q/K for llama.cpp's rope layout). llama.cpp runs
# Mistral as "llama"; Qwen2/3 use the NEOX rope layout, which is already HF's, so no permutation.
ARCHS: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
OUT_TYPES = ("f16", "q8_0", "f32")
_SOURCE_DTYPES = {"F32", "F16", "BF16", "F64"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="HF model directory or toolkit checkpoint")
    parser.add_argument("out", metavar="OUT", help="output .gguf file")
    parser.add_argument("--type", choices=OUT_TYPES, default="f16",
                        help="weight type of 2-D tensors (1-D tensors stay f32); default f16")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


@dataclass(frozen=True)
class ModelParams:
    """What the GGUF header needs from config.json (raw JSON, old and new transformers layouts)."""

    hf_arch: str
    gguf_arch: str
    permute_qk: bool
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    explicit_head_dim: bool
    context: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tied: bool


def read_params(hf_dir: Path) -> tuple[ModelParams, dict[str, Any]]:
    """Parse and check ``config.json``; refuse what the GGUF writer here cannot describe."""
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{hf_dir / 'config.json'} is not readable JSON ({e})") from None
    archs = cfg.get("architectures") or [f"<none; model_type {cfg.get('model_type')!r}>"]
    if archs[0] not in ARCHS:
        raise UsageError(f"architecture {archs[0]} is not supported by to-gguf (supported: {', '.join(ARCHS)})")
    if cfg.get("quantization_config") or (hf_dir / "hf_quant_config.json").is_file():
        raise UsageError(f"{hf_dir} holds a quantized export; to-gguf needs unquantized (bf16/fp16/fp32) weights")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UsageError(f"hidden_act {cfg['hidden_act']!r} is not supported (llama.cpp's {archs[0]} uses silu)")
    gguf_arch, permute = ARCHS[archs[0]]
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}  # transformers 5 layout; older files use rope_theta/rope_scaling
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    params = ModelParams(
        hf_arch=archs[0], gguf_arch=gguf_arch, permute_qk=permute,
        layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], ffn=cfg["intermediate_size"],
        heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, explicit_head_dim="head_dim" in cfg,
        context=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
        rms_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling, tied=bool(cfg.get("tie_word_embeddings", False)),
    )
    return params, cfg


def _rope_scaling_keys(writer: Any, p: ModelParams) -> list[tuple[str, Any]]:
    """Write rope-scaling keys; return extra tensors (llama3 scaling is a per-frequency tensor)."""
    import gguf

    s = p.rope_scaling
    if not s:
        return []
    kind = s.get("rope_type") or s.get("type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(s["factor"])
        return []
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(s["factor"])
        writer.add_rope_scaling_orig_ctx_len(s.get("original_max_position_embeddings", p.context))
        return []
    if kind == "llama3" and p.gguf_arch == "llama":
        return [("rope_freqs.weight", _llama3_rope_factors(p.head_dim, p.rope_theta, s))]
    raise UsageError(f"rope scaling {kind!r} is not supported for {p.hf_arch} (supported: linear, yarn, llama3)")


def _llama3_rope_factors(head_dim: int, theta: float, s: dict[str, Any]) -> Any:
    """Llama 3.1's frequency-dependent scaling, as the divisor llama.cpp applies per frequency."""
    import numpy as np

    factor, low, high = s.get("factor", 8.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise UsageError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [hf_dir / n for n in names]
    # Without an index, model.safetensors alone: Mistral repos also ship consolidated.safetensors
    # (the same weights under mistral-inference names) beside it.
    single = hf_dir / "model.safetensors"
    files = [single] if single.is_file() else sorted(hf_dir.glob("*.safetensors"))
    if not files:
        hint = " (convert .bin/.pt weights with `to-safetensors` first)" if any(hf_dir.glob("*.bin")) else ""
        raise UsageError(f"{hf_dir} has no safetensors weights{hint}")
    return files


def _rope_permute(w: Any, n_head: int) -> Any:
    """HF's rotate-half layout -> llama.cpp's adjacent-pair layout: within each head, rows
    [x0..x(d/2-1), y0..y(d/2-1)] become [x0, y0, x1, y1, ...]. Works for weights and biases."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass
class _Entry:
    """One output tensor: where it goes, its GGUF type, and how to produce its f32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], Any]  # -> float32 numpy array in GGUF row layout
    params: int


def _out_qtype(shape: tuple[int, ...], out_type: str) -> Any:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) < 2 or out_type == "f32":  # norms and biases stay F32, as llama.cpp keeps them
        return Q.F32
    if out_type == "q8_0":
        # Q8_0 packs rows in blocks of 32; a row that does not divide falls back to F16 (llama.cpp too).
        return Q.Q8_0 if shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return Q.F16


def _plan(p: ModelParams, files: list[Path], handles: list[Any], out_type: str) -> list[_Entry]:
    import gguf
    import torch

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == p.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, p.layers)
    names = {n: h for h in handles for n in h.keys()}
    tied = p.tied or "lm_head.weight" not in names
    entries: list[_Entry] = []
    for hf_name in sorted(names, key=_hf_order):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by the runtime / the tied output reuses token_embd
        sl = names[hf_name].get_slice(hf_name)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UsageError(f"tensor {hf_name} has no GGUF name for llama.cpp's {p.gguf_arch} architecture")
        if dtype not in _SOURCE_DTYPES:
            raise UsageError(f"tensor {hf_name} is {dtype}; to-gguf needs float weights (not a quantized export)")
        n_head = 0
        if p.permute_qk and (".attn_q." in gname or ".attn_k." in gname):
            n_head = p.heads if ".attn_q." in gname else p.kv_heads
            if shape[0] != n_head * p.head_dim:
                raise UsageError(f"{hf_name} has {shape[0]} rows, expected {n_head} heads x {p.head_dim}")

        def load(h=names[hf_name], n=hf_name, n_head=n_head) -> Any:
            t = h.get_tensor(n).to(torch.float32)
            return (_rope_permute(t, n_head) if n_head else t).numpy()

        entries.append(_Entry(gname, shape, _out_qtype(shape, out_type), load, math.prod(shape)))
    embd = next((e for e in entries if e.name == "token_embd.weight"), None)
    if embd is None:
        raise UsageError(f"no embedding tensor (model.embed_tokens.weight) in {files[0].parent}")
    if embd.shape[0] != p.vocab_size:  # the token list is sized from config; the two must agree
        raise UsageError(f"embedding has {embd.shape[0]} rows but config.json says vocab_size {p.vocab_size}")
    return entries


def _hf_order(name: str) -> tuple[int, int, str]:
    # token_embd, then blocks in numeric order, then the final norm and output (llama.cpp's order).
    parts = name.split(".")
    if "layers" in parts and parts[parts.index("layers") + 1].isdigit():
        return (1, int(parts[parts.index("layers") + 1]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quant_shape_to_byte_shape

    if qtype == Q.F32:
        return 4 * math.prod(shape)
    if qtype == Q.F16:
        return 2 * math.prod(shape)
    return math.prod(quant_shape_to_byte_shape(shape, qtype))


def _encode(data: Any, qtype: Any) -> Any:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


@dataclass
class GGUFSummary:
    arch: str
    tensors: int
    params: int
    type: str


def write_gguf(hf_dir: Path, out_path: Path, out_type: str, model_name: str | None = None) -> GGUFSummary:
    """Convert the HF directory ``hf_dir`` into the GGUF file ``out_path`` (written in place:
    callers stage it, see ``post_training.io.atomic.staged_file``)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from post_training.checkpointing.tools.gguf_tokenizer import read_vocab, write_vocab

    if out_type not in OUT_TYPES:
        raise UsageError(f"--type {out_type!r}: choose one of {', '.join(OUT_TYPES)}")
    p, cfg = read_params(hf_dir)
    vocab = read_vocab(hf_dir, p.vocab_size, cfg)  # before any tensor work: a refusal costs nothing
    files = _safetensors_files(hf_dir)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        entries = _plan(p, files, handles, out_type)
        writer = gguf.GGUFWriter(out_path, p.gguf_arch)
        stack.callback(writer.close)
        for name, data in _rope_scaling_keys(writer, p):
            entries.append(_Entry(name, data.shape, gguf.GGMLQuantizationType.F32, lambda d=data: d, 0))
        total = sum(e.params for e in entries)

        # general.*: name / basename / size label / licence from the model card, as llama.cpp does.
        meta = gguf.Metadata.load(None, hf_dir, model_name, total)
        meta.name = meta.name or model_name or hf_dir.name
        meta.size_label = meta.size_label or gguf.size_label(total, 0, 0, 0)
        writer.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(writer)

        writer.add_vocab_size(p.vocab_size)
        writer.add_context_length(p.context)
        writer.add_embedding_length(p.hidden)
        writer.add_block_count(p.layers)
        writer.add_feed_forward_length(p.ffn)
        writer.add_head_count(p.heads)
        writer.add_head_count_kv(p.kv_heads)
        writer.add_layer_norm_rms_eps(p.rms_eps)
        writer.add_rope_freq_base(p.rope_theta)
        if p.gguf_arch == "llama":  # transformers reads head_dim back from this key for llama
            writer.add_rope_dimension_count(p.head_dim)
        if p.explicit_head_dim:
            writer.add_key_length(p.head_dim)
            writer.add_value_length(p.head_dim)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, vocab)

        for e in entries:  # tensor infos need sizes only: data comes later, one tensor at a time
            writer.add_tensor_info(e.name, e.shape, np.dtype(np.float32), _nbytes(e.shape, e.qtype), raw_dtype=e.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in entries:
            writer.write_tensor_data(_encode(e.load(), e.qtype))
    return GGUFSummary(arch=p.gguf_arch, tensors=len(entries), params=total, type=out_type)


@contextlib.contextmanager
def hf_source(ckpt: Path, scratch: Path) -> Iterator[tuple[Path, str | None]]:
    """Yield ``(hf_dir, model_name)`` for CKPT; a toolkit checkpoint is consolidated into a
    temporary directory under ``scratch`` (beside the output, so on a disk with room) first."""
    from post_training.io.layout import is_checkpoint_root, is_dist_checkpoint_dir

    if not ckpt.is_dir():
        raise UsageError(f"{ckpt}: no such checkpoint directory")
    if is_checkpoint_root(ckpt) or is_dist_checkpoint_dir(ckpt):
        from post_training.checkpointing.tools import consolidate

        fn = getattr(consolidate, "consolidate_to_hf", None)
        if fn is None:
            raise UsageError(f"{ckpt} is a sharded toolkit checkpoint: run consolidate first "
                             "(python -m post_training.ckpt consolidate) and pass its HF directory")
        tmp = Path(tempfile.mkdtemp(prefix=".to-gguf-", dir=scratch))
        try:
            # "keep": the stored dtype, so no rounding happens before the one to the GGUF type.
            hf_dir = fn(ckpt, tmp / "hf", "keep")
            yield Path(hf_dir), (ckpt if is_checkpoint_root(ckpt) else ckpt.parent).resolve().name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if not (ckpt / "config.json").is_file():
        raise UsageError(f"{ckpt} is neither a Hugging Face model directory (no config.json) "
                         "nor a toolkit checkpoint")
    yield ckpt, None


def run(args: argparse.Namespace) -> int:
    from post_training.io.atomic import staged_file

    out = Path(args.out)
    with staged_file(out, args.overwrite) as tmp:  # refuses an existing OUT before any work
        with hf_source(Path(args.ckpt), out.parent) as (hf_dir, name):
            s = write_gguf(hf_dir, tmp, args.type, model_name=name)
    mib = out.stat().st_size / 2**20
    print(f"wrote {out}: {s.arch}, {s.tensors} tensors, {s.params / 1e6:.1f}M params, {s.type} ({mib:.1f} MiB)")
    return 0
