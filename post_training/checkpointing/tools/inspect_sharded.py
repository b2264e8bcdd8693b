"""``inspect`` analysers for sharded training checkpoints.

megatron-core ``torch_dist`` checkpoints (ours, with ``toolkit_meta.json``, and plain Megatron-LM
ones) and raw torch.distributed.checkpoint directories, read from the DCP metadata alone;
Megatron-LM legacy ``mp_rank_*/model_optim_rng.pt`` files; DeepSpeed ZeRO partitions. Each fills a
:class:`~post_training.checkpointing.tools.inspect_report.Report`.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from post_training.io import layout as cio
from post_training.checkpointing.tools import inspect_readers as R
from post_training.checkpointing.tools import layouts as L
from post_training.checkpointing.tools.inspect_report import Report, dedup, hf_config, short, tokenizer_checks

# Megatron tensor-parallel splits, by name: column-parallel along dim 0, row-parallel along dim 1;
# everything else (norms, row-parallel biases) is replicated on every TP rank.
_TP_SPLIT = re.compile(r"(word_embeddings|output_layer|lm_head|linear_qkv|linear_fc1|query_key_value"
                       r"|dense_h_to_4h)\.(weight|bias)$|(linear_proj|linear_fc2|self_attention\.dense"
                       r"|dense_4h_to_h)\.weight$")


# ----------------------------------------------------------------------------- Megatron side
def _dcp_category(fqn: str) -> str:
    if fqn.startswith("optimizer"):
        return "optimizer state"
    if fqn.startswith("rng_state"):
        return "RNG"
    return "weights"


def _analyse_dcp_dir(rep: Report, d: Path) -> Any:
    """Set roles and pickle flags of one DCP directory's files from its metadata; return it."""
    md, used = R.dcp_metadata(d)
    meta_file = rep.files.get(d / ".metadata")
    if meta_file is not None:  # torch reads it with a plain pickle.load
        meta_file.update(pickle="needs_globals", pickle_globals=used,
                         detail="read by torch with pickle.load; only DCP classes referenced (checked)")
    cats: dict[str, set[str]] = {}
    for idx, info in (md.storage_data or {}).items():
        cats.setdefault(info.relative_path, set()).add(_dcp_category(idx.fqn))
    for rel, (kind, names) in R.dcp_bytes_globals(d, md).items():
        p = d / rel
        if kind == "missing" or p not in rep.files:
            rep.problems.append(f"{rel} is listed in {d.name}/.metadata but missing")
            rep.missing_deploy.append(f"shard {rel}")
            continue
        rep.files[p].update(pickle=kind, pickle_globals=names)
        order = ["weights", "optimizer state", "RNG"]
        in_mo = "modelopt_state" in p.parts
        rep.set_role(p, "modelopt state" if in_mo else "+".join(c for c in order if c in cats[rel]))
    return md


def _dcp_shards(rep: Report, d: Path) -> None:
    """``__<rank>_<n>.distcp``: how many shard files, written by how many ranks."""
    shards = [p for p in rep.files if p.parent == d and L.DISTCP.match(p.name)]
    ranks = {int(L.DISTCP.match(p.name)[1]) for p in shards}  # type: ignore[index]
    rep.layout.update(weight_files=len(shards), ranks=len(ranks) or None)


def _dcp_params(rep: Report, md: Any) -> None:
    tensors = {k: (list(v.size), str(v.properties.dtype).replace("torch.", ""))
               for k, v in md.state_dict_metadata.items()
               if hasattr(v, "size") and _dcp_category(k) == "weights"}
    rep.add_tensors(tensors)


def _dcp_tp_pp(md: Any) -> tuple[int | None, int | None]:
    """TP and PP from the RNG ShardedObject's global shape ``(pp, tp)`` when saved, else TP
    from how the row-parallel / embedding matrices are chunked."""
    for k in md.state_dict_metadata:
        m = re.match(r"^rng_state/shard_[\d.]+_(\d+)\.(\d+)", k)
        if m:
            return int(m.group(2)), int(m.group(1))
    counts = []
    for k, v in md.state_dict_metadata.items():
        if not hasattr(v, "size") or _dcp_category(k) != "weights":
            continue
        dims = range(1 if ".layers." in f".{k}" else 0, len(v.size))  # dim 0 of stacked layers
        split = 1
        for dim in dims:
            split *= len({c.offsets[dim] for c in v.chunks})
        if k.endswith(("linear_proj.weight", "word_embeddings.weight")):
            return split, None
        if len(dims) >= 2:
            counts.append(split)
    return (Counter(counts).most_common(1)[0][0] if counts else None), None


def analyse_megatron_dist(rep: Report) -> None:
    it = rep.lay.main
    rep.layout["format"] = "torch_dist"
    md = _analyse_dcp_dir(rep, it)
    keys = set(md.state_dict_metadata)
    if (it / "modelopt_state" / ".metadata").is_file():
        _analyse_dcp_dir(rep, it / "modelopt_state")
    _dcp_params(rep, md)
    tp, pp = _dcp_tp_pp(md)
    _dcp_shards(rep, it)
    rep.layout.update(tp=tp, pp=pp)
    common = R.peek_torch(it / "common.pt") if (it / "common.pt").is_file() else None
    common = common if isinstance(common, dict) else {}
    parts = (("optimizer", "optimizer state"), ("opt_param_scheduler", "scheduler"), ("rng_state", "RNG"))
    roles = ["metadata"] + [r for k, r in parts if k in common]
    if (it / "common.pt") in rep.files:
        rep.set_role(it / "common.pt", "+".join(roles))
    args = vars(common["args"]) if hasattr(common.get("args"), "__dict__") else {}
    rep.layout["iteration"] = common.get("iteration")
    meta = cio.read_meta(it)
    if meta:
        par = meta.get("parallel", {})
        rep.layout.update(tp=par.get("tp", tp), pp=par.get("pp", pp), dp=par.get("dp"),
                          iteration=meta.get("iteration", rep.layout["iteration"]))
        rep.architecture = meta.get("architecture")
        if meta.get("modelopt_modes"):
            rep.notes.append(f"ModelOpt modes: {', '.join(map(str, meta['modelopt_modes']))}")
        _check_recorded_sizes(rep, it, meta)
        contents = meta.get("contents", {})
    else:
        rep.layout.update(tp=args.get("tensor_model_parallel_size", tp),
                          pp=args.get("pipeline_model_parallel_size", pp), dp=args.get("data_parallel_size"))
        cats = {_dcp_category(k) for k in keys}
        contents = {"optimizer": "optimizer state" in cats or "optimizer" in common,
                    "scheduler": "opt_param_scheduler" in common, "rng": "RNG" in cats or "rng_state" in common}
    hf_cfg = [p for p in rep.files if p.parent.name == cio.HF_CONFIG_DIR and p.name == "config.json"]
    if hf_cfg:
        arch = rep.architecture
        hf_config(rep, hf_cfg[0])
        rep.architecture = rep.architecture or arch
    elif args:
        rep.architecture = rep.architecture or _megatron_arch(args)
    for key, what in (("optimizer", "optimizer state"), ("scheduler", "scheduler state"), ("rng", "RNG state")):
        if not contents.get(key):
            rep.missing_resume.append(what)
    if not hf_cfg:
        rep.missing_deploy.append(f"HF config.json ({cio.HF_CONFIG_DIR}/ beside the iterations)")
    tokenizer_checks(rep, f" ({cio.HF_CONFIG_DIR}/)")
    modes = [str(m) for m in (meta.get("modelopt_modes") or [])] if meta else []
    if any("quant" in m for m in modes):  # the modes consolidate refuses (it would drop the quantization)
        src = it.parent if cio.is_checkpoint_root(it.parent) else it
        rep.missing_deploy.append(f"a Hugging Face export (quantized with ModelOpt modes {', '.join(modes)}; "
                                  "consolidate would drop the quantization): run ModelOpt's unified HF "
                                  f"export, `MLM_MODEL_CKPT={src} EXPORT_DIR=<out> bash scripts/export.sh`")
    else:
        rep.missing_deploy.append("consolidated weights (sharded megatron-core checkpoint: run "
                                  "`python -m post_training.ckpt consolidate` for a Hugging Face directory)")


def _check_recorded_sizes(rep: Report, it: Path, meta: dict) -> None:
    for rel, rec in meta.get("files", {}).items():
        p = it / rel
        if not p.is_file():
            rep.problems.append(f"{rel} is recorded in {cio.META} but missing")
        elif p.stat().st_size != rec.get("bytes"):
            rep.problems.append(f"{rel} is {p.stat().st_size} bytes, {rec.get('bytes')} when saved "
                                "(truncated?)")


def _megatron_arch(args: dict) -> str:
    return (f"Megatron GPT ({args.get('num_layers')} layers, hidden {args.get('hidden_size')}, "
            f"{args.get('num_attention_heads')} heads)")


def _tp_multiplier(tp: int) -> Callable[[str], int]:
    return lambda name: tp if _TP_SPLIT.search(name) else 1


def analyse_megatron_legacy(rep: Report) -> None:
    it = rep.lay.main
    rep.layout["format"] = "torch (legacy, one file per rank)"
    ranks = {pos: d for d in it.iterdir() if d.is_dir() and (pos := L.mp_rank_position(d.name))}
    tp = max(p[0] for p in ranks) + 1
    pp = max(p[1] for p in ranks) + 1
    rep.layout.update(tp=tp, pp=pp, ranks=len(ranks))
    for t in range(tp):
        for s in range(pp):
            if not any(pos[:2] == (t, s) for pos in ranks):
                rep.problems.append(f"no rank dir for tp rank {t}, pp rank {s}")
    weights = [p for p in rep.files if p.name == "model_optim_rng.pt"]
    rep.layout["weight_files"] = len(weights)
    first, tied = None, True
    for s in range(pp):  # TP rank 0 of each stage gives shapes; TP-split tensors scale by tp
        f = ranks[(0, s, 0)] / "model_optim_rng.pt" if (0, s, 0) in ranks else None
        obj = R.peek_torch(f) if f is not None and f.is_file() else None
        if not isinstance(obj, dict):
            e = rep.files.get(f) if f is not None else None
            why = f"pickle globals {short(e['pickle_globals'])}" if e and e["pickle_globals"] else "missing"
            rep.unknown_params(f"the model file of pp stage {s} not read ({why})")
            break
        first = first or obj
        model = dedup(R.tensors_in({k: v for k, v in obj.items() if re.match(r"^model\d*$", k)}))
        if s > 0:  # the last stage's copy of a tied embedding is not another parameter
            model = {k: v for k, v in model.items() if not k.endswith("word_embeddings_for_head.weight")
                     and not (k.endswith("output_layer.weight") and tied)}
        else:
            args0 = vars(obj["args"]) if hasattr(obj.get("args"), "__dict__") else {}
            tied = not args0.get("untie_embeddings_and_output_weights", False)
        rep.add_tensors(model, _tp_multiplier(tp))
    if first is not None:
        keys = set(first)
        role = "+".join(r for k, r in (("model", "weights"), ("optimizer", "optimizer state"),
                                       ("opt_param_scheduler", "scheduler"), ("rng_state", "RNG")) if k in keys)
        for p in weights:
            rep.set_role(p, role or "other")
        args = vars(first["args"]) if hasattr(first.get("args"), "__dict__") else {}
        rep.layout["iteration"] = first.get("iteration")
        if args:
            rep.architecture = _megatron_arch(args)
            rep.layout["dp"] = args.get("data_parallel_size")
            for k, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
                if args.get(k) not in (None, v):
                    rep.problems.append(f"args.{k}={args[k]} but the rank dirs say {v}")
        has_opt = "optimizer" in keys or any(p.name == "distrib_optim.pt" for p in rep.files)
        for ok, what in ((has_opt, "optimizer state"), ("opt_param_scheduler" in keys, "scheduler state"),
                         ("rng_state" in keys, "RNG state")):
            if not ok:
                rep.missing_resume.append(what)
    hf = [p for p in rep.files if p.parent.name == cio.HF_CONFIG_DIR and p.name == "config.json"]
    if hf:
        hf_config(rep, hf[0])
    else:
        rep.missing_deploy.append("HF config.json")
    tokenizer_checks(rep, " (Megatron keeps none in the checkpoint)")
    rep.missing_deploy.append(f"consolidated weights (legacy checkpoint sharded TP={tp}, PP={pp}: run "
                              "`python -m post_training.ckpt consolidate`)")


def analyse_dcp(rep: Report) -> None:
    rep.layout["format"] = "torch.distributed.checkpoint"
    _dcp_params(rep, _analyse_dcp_dir(rep, rep.lay.main))
    _dcp_shards(rep, rep.lay.main)
    rep.missing_deploy.append("config.json, tokenizer and consolidated weights (a raw DCP directory)")



# ----------------------------------------------------------------------------- DeepSpeed
def analyse_deepspeed(rep: Report, in_trainer: bool = False) -> None:
    ds = rep.lay.deepspeed_dir
    assert ds is not None
    names = {p.name: p for p in rep.files if p.parent == ds}
    # (dp rank, mp rank) -> file
    optim = {(int(m[2]), int(m[3])): p for n, p in names.items() if (m := L.DS_OPTIM.match(n))}
    zero3 = {(int(m[1]), int(m[2])): p for n, p in names.items() if (m := L.DS_ZERO3_MODEL.match(n))}
    models = {int(m.group(1)): p for n, p in names.items() if (m := L.DS_MODEL.match(n))}
    layers = [p for n, p in names.items() if L.DS_LAYER.match(n)]
    mp = len({k[1] for k in optim} | {k[1] for k in zero3} | set(models)) or None
    stage, partition = None, None
    first_opt = optim[min(optim)] if optim else None
    opt0 = R.peek_torch(first_opt) if first_opt and rep.files[first_opt]["pickle"] == "weights_only" else None
    if isinstance(opt0, dict) and isinstance(opt0.get("optimizer_state_dict"), dict):
        osd = opt0["optimizer_state_dict"]
        stage = int(osd["zero_stage"]) if osd.get("zero_stage") is not None else None
        partition = osd.get("partition_count")
    model_file = models.get(0) or zero3.get((0, 0))
    readable = model_file is not None and rep.files[model_file]["pickle"] == "weights_only"
    states = R.peek_torch(model_file) if readable else None
    states = states if isinstance(states, dict) else {}
    zero_cfg = (states.get("ds_config") or {}).get("zero_optimization") or {}
    if stage is None:
        stage = zero_cfg.get("stage", 3 if zero3 else None)
    if stage is None and optim:
        rep.notes.append("ZeRO stage unknown: the optimizer files need pickle globals to read")
    if isinstance(partition, (list, tuple)) and partition:
        partition = partition[0]
    # The files present can undercount DP when one is missing; the recorded sizes cannot.
    ranks_seen = [k[0] + 1 for k in list(optim) + list(zero3)]
    dp = max([*ranks_seen, int(partition or 0), int(states.get("dp_world_size") or 0)]) or None
    rep.layout.update(format="deepspeed", zero_stage=stage, dp=dp, tp=states.get("mp_world_size") or mp,
                      pp=(f"{len(layers)} layer files" if layers else None),
                      iteration=rep.layout["iteration"] or states.get("global_steps"),
                      ranks=(dp or 1) * (mp or 1), weight_files=len(models) + len(layers))
    if states.get("ds_version"):
        rep.notes.append(f"saved by DeepSpeed {states['ds_version']}")
    # Stage 3 keeps the weights only as fp32 partitions inside the optimizer files.
    for p in optim.values():
        rep.set_role(p, "optimizer state+weights" if stage == 3 else "optimizer state")
    for p in zero3.values():
        rep.set_role(p, "metadata")
    if model_file in models.values() and states:
        rep.set_role(model_file, "+".join(r for k, r in (("module", "weights"), ("lr_scheduler", "scheduler"))
                                          if states.get(k) is not None) or "metadata")
    shapes = states.get("param_shapes")
    if shapes is not None:
        groups = shapes if isinstance(shapes, (list, tuple)) else [shapes]
        dtype = _ds_dtype(states)
        tensors = {n: (list(s), dtype) for g in groups for n, s in g.items()}
        tensors.update({n: (list(s), dtype) for n, s in (states.get("frozen_param_shapes") or {}).items()})
        rep.params = 0
        rep.add_tensors(tensors, _tp_multiplier(mp or 1))
    elif not in_trainer or not rep.of_role("weights"):
        rep.unknown_params("no readable param_shapes in the model states file")
    if in_trainer:
        _count_hf_side(rep)
    for m in sorted(set(k[1] for k in optim)):
        for r in range(dp or 0):
            if (r, m) not in optim:
                rep.problems.append(f"optimizer partition for dp rank {r}, mp rank {m} missing")
                rep.missing_resume.append(f"optimizer partition dp={r} mp={m}")
    if not optim:
        rep.missing_resume.append("optimizer state (no *_optim_states.pt)")
    if not (ds.parent / "latest").is_file() and not in_trainer:
        rep.missing_resume.append("'latest' pointer (or pass the tag explicitly)")
    if not in_trainer:
        if not (ds.parent / "config.json").is_file():
            rep.missing_deploy.append("config.json and tokenizer (DeepSpeed saves the model only)")
        else:
            hf_config(rep, ds.parent / "config.json")
    hf_weights = in_trainer and any(p.parent == rep.lay.main for p in rep.of_role("weights"))
    if not hf_weights:
        what = f"ZeRO-{stage} partitions" if stage else "DeepSpeed module states"
        rep.missing_deploy.append(f"consolidated weights ({what}: run zero_to_fp32.py or "
                                  "`python -m post_training.ckpt consolidate`)")


def _count_hf_side(rep: Report) -> None:
    """An HF Trainer + DeepSpeed checkpoint may also hold the model as HF files."""
    hf = [p for p in rep.of_role("weights") if p.parent == rep.lay.main and p.suffix == ".safetensors"]
    if hf:
        rep.params, rep.dtypes = 0, Counter()
        for p in hf:
            rep.add_tensors({k: (v["shape"], v["dtype"]) for k, v in R.safetensors_header(p)[0].items()})


def _ds_dtype(states: dict) -> str:
    module = states.get("module")
    if isinstance(module, dict):
        for t in R.tensors_in(module).values():
            return str(t.dtype).replace("torch.", "")
    cfg = states.get("ds_config") or {}
    return "bfloat16" if (cfg.get("bf16") or {}).get("enabled") else \
        "float16" if (cfg.get("fp16") or {}).get("enabled") else "float32"

