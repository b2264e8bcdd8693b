"""Megatron model -> unified Hugging Face checkpoint (``scripts/export.sh``), via ModelOpt's
``export_mcore_gpt_to_hf``.

What ModelOpt 0.47 writes (``modelopt/torch/export/unified_export_megatron.py``): one safetensors
file per decoder layer plus an index, config.json (with ``quantization_config`` when quantized),
generation_config.json, every non-safetensors file of the source HF directory (tokenizer, chat
template), and ``hf_quant_config.json`` for quantized models. It has no shard-size option, so the
layer files are repacked here into ``--export-max-shard-size`` shards (one ``model.safetensors``
when everything fits, else ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).

What it does not do, and what this module adds:

- Tensor parallelism: the exporter writes each rank's *local* slice under the full-model name,
  every TP rank into the same files (last writer wins; ``gate_proj`` even gets the right shape
  with the wrong rows). Here TP rank 0 exports from weights gathered over its TP group and the
  other ranks write into a throw-away directory. PP needs nothing: each stage writes its layers.
- Formats: ``save_pretrained`` names only FP8, FP8 block (``fp8_pb_real/_wo``), NVFP4 and
  W4A16-NVFP4 in ``hf_quant_config.json``; other formats would be written as unlabeled packed
  weights (MXFP8), or fail inside ModelOpt (INT8, INT4-AWQ, FP8 per-channel), and a KV-cache-only
  model gets ``k_scale`` tensors with no config naming them. Those are refused up front.
- Atomicity: everything is written into a hidden sibling and renamed at the end.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from post_training.config import ExportConfig
from post_training.io.atomic import check_output_dir, commit, new_staging_dir
from post_training.io.formats import dtype_name
from post_training.io.hf_files import finalize
from post_training.runtime import Runtime
from post_training.runtime.collectives import broadcast_object, gather_objects, rank0_then_share
from post_training.utils import UsageError, print_rank_0, rank, unwrap

# Weight formats GPTModelExporter.save_pretrained names in hf_quant_config.json (ModelOpt 0.47).
SUPPORTED_FORMATS = ("fp8", "fp8_pb_real", "fp8_pb_wo", "nvfp4", "w4a16_nvfp4")
SUPPORTED_KV_FORMATS = ("FP8", "NVFP4")  # the KV-cache dtypes it records (kv_cache_quant_algo)
TP_FORMATS = ("fp8",)  # per-tensor scales only: block scales would need gathering too
# TP-sharded parameters of the dense GPT layers this module gathers (others are refused at TP>1).
_GATHERABLE = re.compile(r"(embedding\.word_embeddings|linear_qkv|linear_proj|linear_fc1|"
                         r"linear_fc2|output_layer)\.(weight|bias)$")


# ----------------------------------------------------------------------------- checks


def quantization_formats(model) -> tuple[set[str], set[str]]:
    """(weight formats, KV-cache formats) of this rank's stage, as ModelOpt's exporter reads them."""
    from modelopt.torch.export.quant_utils import get_kv_cache_dtype, get_quantization_format

    weights, kv = set(), set()
    for m in model.modules():
        if hasattr(m, "weight_quantizer"):
            try:
                fmt = get_quantization_format(m)
            except (NotImplementedError, AssertionError) as e:
                fmt = f"unrecognized ({e})"
            if fmt is not None:
                weights.add(fmt)
        if hasattr(m, "k_bmm_quantizer"):
            if (kv_fmt := get_kv_cache_dtype(m)) is not None:
                kv.add(kv_fmt)
    return weights, kv


def export_problem(weights: set[str], kv: set[str], tp: int) -> str | None:
    """Why ModelOpt's exporter would write a wrong or unlabeled checkpoint, or None."""
    bad = sorted(weights - set(SUPPORTED_FORMATS))
    if bad:
        return (f"quantization format {', '.join(bad)} cannot be exported by ModelOpt's "
                f"export_mcore_gpt_to_hf (supported: {', '.join(SUPPORTED_FORMATS)}, or unquantized)")
    bad_kv = sorted(kv - set(SUPPORTED_KV_FORMATS))
    if bad_kv:
        return (f"KV-cache quantization {', '.join(bad_kv)} cannot be exported by ModelOpt's "
                f"export_mcore_gpt_to_hf (supported: {', '.join(SUPPORTED_KV_FORMATS)})")
    if kv and not weights:
        return ("KV-cache-only quantization cannot be exported: ModelOpt's export_mcore_gpt_to_hf "
                "writes hf_quant_config.json only for quantized weights, so the k/v scales would be "
                "unlabeled")
    if tp > 1 and (weights - set(TP_FORMATS) or kv - {"FP8"}):
        fmts = ", ".join(sorted((weights - set(TP_FORMATS)) | (kv - {"FP8"})))
        return (f"export at TP={tp} supports unquantized and FP8 models, not {fmts} (block scales are "
                f"split over TP ranks): run it with TP=1 (PP is fine); the checkpoint reshards on load")
    return None


def check_exportable(model, rt: Runtime) -> set[str]:
    """Refuse, on every rank alike, what ModelOpt cannot export correctly. Returns the formats."""
    weights, kv = quantization_formats(model)
    box = gather_objects((weights, kv))  # PP stages see different layers
    weights, kv = set().union(*(b[0] for b in box)), set().union(*(b[1] for b in box))
    problem = export_problem(weights, kv, rt.tp)
    if problem:
        raise UsageError(problem)
    return weights | {f"kv:{k}" for k in kv}


# ----------------------------------------------------------------------------- TP gather


def _gather_tp_param(p: torch.Tensor, tp: int) -> torch.Tensor | None:
    """The full tensor on TP rank 0 (None elsewhere), undoing megatron's split: the master
    tensor is cut into tp * stride chunks along ``partition_dim`` and rank r holds chunks
    r, r + tp, ... (stride 2: a gated fc1 holds [gate_r; up_r])."""
    from megatron.core import parallel_state as ps

    lead = ps.get_tensor_model_parallel_rank() == 0
    parts = [torch.empty_like(p) for _ in range(tp)] if lead else None
    dist.gather(p.detach().contiguous(), parts, dst=ps.get_tensor_model_parallel_src_rank(),
                group=ps.get_tensor_model_parallel_group())
    if not lead:
        return None
    dim, stride = p.partition_dim, getattr(p, "partition_stride", 1)
    chunks = [t.chunk(stride, dim=dim) for t in parts]
    return torch.cat([c[i] for i in range(stride) for c in chunks], dim=dim)


@contextlib.contextmanager
def tp_gathered(model, rt: Runtime) -> Iterator[None]:
    """While open, TP rank 0 holds the full (TP=1) weights of its stage, so ModelOpt's exporter
    sees what it would at TP=1; scalar quantizer amax is max-reduced over TP (what calibration
    at TP=1 gives). Everything is restored on exit. Memory: one full stage on TP rank 0."""
    if rt.tp == 1:
        yield
        return
    from megatron.core import parallel_state as ps

    shards: list[tuple[torch.Tensor, torch.Tensor]] = []
    amaxes: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not getattr(p, "tensor_model_parallel", False):
                    continue
                if not _GATHERABLE.search(name):
                    raise UsageError(f"export at TP={rt.tp} cannot gather {name}: run it with TP=1")
                full = _gather_tp_param(p, rt.tp)
                if full is not None:
                    shards.append((p, p.data))
                    p.data = full
            for buf_name, buf in model.named_buffers():
                if buf_name.endswith("._amax") and buf.numel() == 1:
                    top = buf.clone()
                    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
                    if not torch.equal(top, buf):
                        amaxes.append((buf, buf.clone()))
                        buf.copy_(top)
        yield
    finally:
        with torch.no_grad():
            for p, shard in shards:
                p.data = shard
            for buf, old in amaxes:
                buf.copy_(old)


# ----------------------------------------------------------------------------- entry


def export_model(model, rt: Runtime, hf_dir: Path, cfg: ExportConfig, model_dtype: torch.dtype) -> Path:
    """Export ``model`` (this rank's stage; every rank calls this) as a unified HF checkpoint.

    ``hf_dir`` is the HF directory the model came from: its config is the template of
    config.json and its tokenizer files are copied. Written to a hidden sibling of
    ``cfg.export_dir`` and renamed at the end: a failed export leaves no partial directory."""
    from megatron.core import parallel_state as ps
    from modelopt.torch.export import export_mcore_gpt_to_hf

    # ModelOpt 0.47's exporter needs the names of its megatron import block, which fails on
    # megatron-core 0.16: the runtime's `modelopt_exporter_imports` patch defines them.
    model = unwrap(model)
    formats = check_exportable(model, rt)
    dtype = cfg.torch_dtype(model_dtype)
    out = Path(cfg.export_dir).absolute()
    t0 = time.perf_counter()
    staging = Path(broadcast_object(str(new_staging_dir(out)) if rank() == 0 else None))
    # One writer per file: TP rank 0 of data-parallel replica 0 (the exporter has every rank
    # write its layers); the others export into a private directory that is thrown away.
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
    target = staging if writer else Path(tempfile.mkdtemp(prefix="pt-export-scratch-"))
    info: dict = {}
    head = draft_head(model, hf_dir)
    try:
        with tp_gathered(model, rt):
            export_mcore_gpt_to_hf(model, str(hf_dir), dtype=dtype, export_dir=str(target))

        def _finish() -> None:
            info["shards"], info["bytes"] = finalize(staging, dtype, cfg.max_shard_size)
            if head is not None:  # after finalize: it repacks only the target's files
                from post_training.speculative.eagle_draft import save_draft_head

                info["draft"] = save_draft_head(*head, staging / draft_dir_name(head[0])).name
            check_output_dir(out, cfg.overwrite, "export dir")  # it may have been filled since --preflight
            commit(staging, out)

        rank0_then_share(_finish)
    finally:
        if not writer:
            shutil.rmtree(target, ignore_errors=True)
        if rank() == 0 and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if info:
        print_rank_0(f"exported {out}: {info['bytes'] / 1e6:.1f} MB in {info['shards']} shard(s), "
                     f"{dtype_name(dtype)}, quantization: "
                     f"{', '.join(sorted(formats)) or 'none'}, TP={rt.tp} PP={rt.pp}, "
                     f"{time.perf_counter() - t0:.1f}s")
        if "draft" in info:
            print_rank_0(f"exported the draft head to {out / info['draft']} (HF {head[0]['architectures'][0]} "
                         "layout: --draft eagle|medusa --draft-model-path reads it)")
    return out


def draft_dir_name(config: dict) -> str:
    """Where a draft head goes inside the export dir: ``eagle3_draft``, ``eagle_draft`` or
    ``medusa_draft`` (Megatron-LM's export.py writes only the head, into EXPORT_DIR itself, when
    the model has one; here the target is exported as always and the head beside it)."""
    arch = (config.get("architectures") or [""])[0]
    return "medusa_draft" if "Medusa" in arch else "eagle3_draft" if "Eagle3" in arch else "eagle_draft"


def draft_head(model, hf_dir: Path) -> tuple[dict, dict] | None:
    """(config, state) of the model's trained draft head in the HF layout on every rank (the
    last stage holds it, TP-gathered), or None when the model carries no ModelOpt speculative
    mode. Collective: every rank calls it."""
    import json

    from post_training.runtime.collectives import broadcast_object_from_last_stage
    from post_training.speculative.heads import draft_kind

    if draft_kind(model) is None:
        return None
    from post_training.speculative.head_state import draft_head_state

    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    head = draft_head_state(model, hf_config) if model.post_process else None
    return broadcast_object_from_last_stage(head)
