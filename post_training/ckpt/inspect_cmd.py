"""``inspect DIR_OR_FILE [--json]``: what a checkpoint is, file by file, without running its code.

For every file: its role, whether inference or resuming training needs it, whether it is safe to
edit by hand, and whether loading it would run pickle code. For the whole: the kind, the
architecture, parameter count, dtypes, size, parallel layout, and what is missing to resume or
to deploy. Layout recognition and the readers live in :mod:`post_training.ckpt.layouts`.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from post_training import checkpoint_io as cio
from post_training.ckpt import layouts as L
from post_training.utils import UsageError

SCHEMA = 1
# Scale/amax side tensors of quantized exports are not model parameters.
_NOT_PARAM = re.compile(r"(_scale|_scale_2|_amax|_quantizer\..*)$")
# Megatron tensor-parallel splits, by name: column-parallel along dim 0, row-parallel along dim 1;
# everything else (norms, row-parallel biases) is replicated on every TP rank.
_TP_SPLIT = re.compile(r"(word_embeddings|output_layer|lm_head|linear_qkv|linear_fc1|query_key_value"
                       r"|dense_h_to_4h)\.(weight|bias)$|(linear_proj|linear_fc2|self_attention\.dense"
                       r"|dense_4h_to_h)\.weight$")
_PICKLE_TEXT = {"none": "-", "weights_only": "safe", "legacy_unchecked": "pickle (legacy format, cannot check)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="DIR_OR_FILE", help="checkpoint directory or single file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def run(args: argparse.Namespace) -> int:
    report = inspect_path(args.path)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


class Report:
    """Collects file entries and the summary while a kind-specific analyser walks the layout."""

    def __init__(self, lay: L.Layout) -> None:
        self.lay = lay
        self.files: dict[Path, dict[str, Any]] = {p: self._entry(p) for p in lay.files}
        self.architecture: str | None = None
        self.params: int | None = 0
        self.dtypes: Counter[str] = Counter()
        self.layout: dict[str, Any] = {"format": None, "tp": None, "pp": None, "dp": None,
                                       "zero_stage": None, "weight_files": 0, "ranks": None,
                                       "iteration": None}
        self.adapter: dict[str, Any] | None = None
        self.missing_resume: list[str] = []
        self.missing_deploy: list[str] = []
        self.problems: list[str] = []
        self.notes: list[str] = list(lay.notes)

    def _entry(self, p: Path) -> dict[str, Any]:
        root = self.lay.root
        inside = root.is_dir() and p.is_relative_to(root)
        role = L.file_role(p.relative_to(root) if inside else Path(p.name))
        e = {"path": _rel(p, root if root.is_dir() else root.parent), "role": role, "inference": False,
             "resume": False, "editable": False, "pickle": "none", "pickle_globals": [],
             "bytes": p.stat().st_size, "detail": ""}
        if p.suffix in (".pt", ".bin", ".pth", ".ckpt") and role != "tool script":
            e["pickle"], e["pickle_globals"] = L.pickle_check(p)
        self.set_role(p, role, e)
        return e

    def set_role(self, p: Path, role: str, e: dict | None = None, resume: bool | None = None) -> None:
        """Set a (possibly combined, ``a+b``) role and derive the flags: a file is needed for
        inference / resume if any of its parts is, and editable only if all are."""
        e = e if e is not None else self.files[p]
        flags = [L.ROLE_FLAGS[r] for r in role.split("+")]
        e["role"] = role
        e["inference"] = any(f[0] for f in flags)
        e["resume"] = any(f[1] for f in flags) if resume is None else resume
        e["editable"] = all(f[2] for f in flags)
        if p.name == cio.META:  # our own record: nothing reads it to run, the loader checks it
            e["inference"] = e["resume"] = False

    def of_role(self, *roles: str) -> list[Path]:
        return [p for p, e in self.files.items() if any(r in e["role"].split("+") for r in roles)]

    def add_tensors(self, tensors: dict[str, tuple[list[int], str]],
                    multiplier: Callable[[str], int] | None = None) -> None:
        """Count parameters and dtypes of ``{name: (shape, dtype)}`` (unless already unknown)."""
        if self.params is None:
            return
        for name, (shape, dtype) in tensors.items():
            if _NOT_PARAM.search(name):
                continue
            n = 1
            for s in shape:
                n *= int(s)
            n *= multiplier(name) if multiplier else 1
            self.params = (self.params or 0) + n
            self.dtypes[dtype] += n

    def unknown_params(self, why: str) -> None:
        self.params = None
        self.notes.append(f"parameter count unknown: {why}")

    def to_dict(self) -> dict[str, Any]:
        files = sorted(self.files.values(), key=lambda e: e["path"])
        return {
            "schema": SCHEMA,
            "path": str(self.lay.root),
            "kind": self.lay.kind,
            "description": self.lay.description,
            "architecture": self.architecture,
            "parameters": self.params,
            "dtypes": dict(sorted(self.dtypes.items(), key=lambda kv: -kv[1])),
            "total_bytes": sum(e["bytes"] for e in files),
            "layout": self.layout,
            "adapter": self.adapter,
            "missing": {"resume": self.missing_resume, "deploy": self.missing_deploy},
            "problems": self.problems,
            "notes": self.notes,
            "files": files,
        }


def inspect_path(path: str | Path) -> dict[str, Any]:
    """The report for ``path`` as a JSON-ready dict (stable keys, see :class:`Report`)."""
    lay = L.detect(path)
    rep = Report(lay)
    _ANALYSERS[lay.kind](rep)
    return rep.to_dict()


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(Path("..") / p.relative_to(base.parent))


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: not readable JSON ({e})") from None


# ----------------------------------------------------------------------------- Hugging Face side
def _hf_config(rep: Report, cfg_path: Path) -> dict:
    if not cfg_path.is_file():
        return {}
    cfg = _read_json(cfg_path)
    arch = (cfg.get("architectures") or [None])[0]
    rep.architecture = f"{arch} ({cfg.get('model_type')})" if arch else cfg.get("model_type")
    if cfg.get("quantization_config"):
        rep.notes.append(f"quantized: {cfg['quantization_config'].get('quant_method', '?')}")
    return cfg


def _count_weight_files(rep: Report, roles: tuple[str, ...] = ("weights", "adapter weights")) -> None:
    """Parameters and dtypes from safetensors headers and weights_only torch loads."""
    files = [p for p in rep.of_role(*roles) if p.suffix != ".gguf"]
    rep.layout["weight_files"] = len(files)
    for p in files:
        e = rep.files[p]
        if p.suffix == ".safetensors":
            tensors, _ = L.safetensors_header(p)
            rep.add_tensors({k: (v["shape"], v["dtype"]) for k, v in tensors.items()})
            e["detail"] = f"{len(tensors)} tensors"
        elif e["pickle"] == "weights_only":
            tensors = _dedup(L.tensors_in(L.peek_torch(p)))
            rep.add_tensors(tensors)
            e["detail"] = f"{len(tensors)} tensors"
        else:
            rep.unknown_params(f"{e['path']} is not read (loading it could run pickle code)")
            return


def _dedup(tensors: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    """``{name: (shape, dtype)}``, counting a storage view shared by tied weights once."""
    out, seen = {}, set()
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = (list(t.shape), str(t.dtype).replace("torch.", ""))
    return out


def _check_index(rep: Report) -> None:
    for idx in rep.of_role("weights index"):
        shards = set(_read_json(idx).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (idx.parent / s).is_file())
        for s in missing:
            rep.problems.append(f"{idx.name} lists {s}, which is missing")
            rep.missing_deploy.append(f"weight shard {s}")
        rep.layout["weight_files"] = len(shards)


def _tokenizer_checks(rep: Report, where: str = "") -> None:
    names = {p.name for p in rep.of_role("tokenizer")}
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"}:
        rep.missing_deploy.append(f"tokenizer{where}")
    if not names:
        return
    templates = rep.of_role("chat template")
    tok_cfg = next((p for p in rep.of_role("tokenizer") if p.name == "tokenizer_config.json"), None)
    if not templates and not (tok_cfg and _read_json(tok_cfg).get("chat_template")):
        rep.notes.append("no chat template: chat prompts cannot be rendered")


_TRAINING_STATE = "training state (optimizer, scheduler, RNG): a model export, not a training checkpoint"


def _analyse_hf(rep: Report) -> None:
    rep.layout["format"] = "safetensors" if rep.of_role("weights") and all(
        p.suffix == ".safetensors" for p in rep.of_role("weights")) else "torch"
    cfg = rep.lay.main / "config.json"
    if not cfg.is_file():
        rep.missing_deploy.append("config.json")
    _hf_config(rep, cfg)
    _count_weight_files(rep)
    _check_index(rep)
    _tokenizer_checks(rep)
    rep.missing_resume.append(_TRAINING_STATE)


def _adapter(rep: Report, path: Path) -> dict:
    cfg = _read_json(path)
    rep.adapter = {"peft_type": cfg.get("peft_type"), "base_model": cfg.get("base_model_name_or_path"),
                   "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                   "target_modules": cfg.get("target_modules")}
    return cfg


def _analyse_peft(rep: Report) -> None:
    cfg = _adapter(rep, rep.lay.main / "adapter_config.json")
    base = cfg.get("base_model_name_or_path")
    base_cls = (cfg.get("auto_mapping") or {}).get("base_model_class")
    rep.architecture = f"{cfg.get('peft_type')} adapter for {base_cls or base}"
    rep.layout["format"] = "safetensors"
    _count_weight_files(rep, ("adapter weights",))
    if not rep.of_role("adapter weights"):
        rep.missing_deploy.append("adapter weights (adapter_model.safetensors)")
    rep.missing_deploy.append(f"base model {base} (load it with the adapter, or run "
                              "`python -m post_training.ckpt merge-lora` to fold the adapter in)")
    rep.missing_resume.append("training state (optimizer, scheduler, RNG): an adapter export only")


def _analyse_trainer(rep: Report) -> None:
    main = rep.lay.main
    state = _read_json(main / "trainer_state.json")
    rep.layout["iteration"] = state.get("global_step")
    rep.layout["format"] = "safetensors"
    if (main / "adapter_config.json").is_file():
        _hf_config(rep, main / "config.json")
        _adapter(rep, main / "adapter_config.json")
    elif not _hf_config(rep, main / "config.json"):
        rep.missing_deploy.append("config.json")
    rng = sorted(p.name for p in rep.of_role("RNG"))
    rep.layout["ranks"] = len(rng) or None
    if rep.lay.deepspeed_dir is not None:
        _analyse_deepspeed(rep, in_trainer=True)
    else:
        _count_weight_files(rep, ("weights", "adapter weights"))
        _check_index(rep)
        for name, what in (("optimizer.pt", "optimizer state (optimizer.pt)"),
                           ("scheduler.pt", "scheduler state (scheduler.pt)")):
            if not (main / name).is_file():
                rep.missing_resume.append(what)
    if not rng:
        rep.missing_resume.append("RNG state (rng_state*.pth): resume works, but not bit-exact")
    _tokenizer_checks(rep, " (the Trainer saved none: copy it from the base model)")


# ----------------------------------------------------------------------------- Megatron side
def _dcp_category(fqn: str) -> str:
    if fqn.startswith("optimizer"):
        return "optimizer state"
    if fqn.startswith("rng_state"):
        return "RNG"
    return "weights"


def _analyse_dcp_dir(rep: Report, d: Path) -> Any:
    """Set roles and pickle flags of one DCP directory's files from its metadata; return it."""
    md, used = L.dcp_metadata(d)
    meta_file = rep.files.get(d / ".metadata")
    if meta_file is not None:  # torch reads it with a plain pickle.load
        meta_file.update(pickle="needs_globals", pickle_globals=used,
                         detail="read by torch with pickle.load; only DCP classes referenced (checked)")
    cats: dict[str, set[str]] = {}
    for idx, info in (md.storage_data or {}).items():
        cats.setdefault(info.relative_path, set()).add(_dcp_category(idx.fqn))
    for rel, (kind, names) in L.dcp_bytes_globals(d, md).items():
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


def _analyse_megatron_dist(rep: Report) -> None:
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
    common = L.peek_torch(it / "common.pt") if (it / "common.pt").is_file() else None
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
        _hf_config(rep, hf_cfg[0])
        rep.architecture = rep.architecture or arch
    elif args:
        rep.architecture = rep.architecture or _megatron_arch(args)
    for key, what in (("optimizer", "optimizer state"), ("scheduler", "scheduler state"), ("rng", "RNG state")):
        if not contents.get(key):
            rep.missing_resume.append(what)
    if not hf_cfg:
        rep.missing_deploy.append(f"HF config.json ({cio.HF_CONFIG_DIR}/ beside the iterations)")
    _tokenizer_checks(rep, f" ({cio.HF_CONFIG_DIR}/)")
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


def _analyse_megatron_legacy(rep: Report) -> None:
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
        obj = L.peek_torch(f) if f is not None and f.is_file() else None
        if not isinstance(obj, dict):
            e = rep.files.get(f) if f is not None else None
            why = f"pickle globals {_short(e['pickle_globals'])}" if e and e["pickle_globals"] else "missing"
            rep.unknown_params(f"the model file of pp stage {s} not read ({why})")
            break
        first = first or obj
        model = _dedup(L.tensors_in({k: v for k, v in obj.items() if re.match(r"^model\d*$", k)}))
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
        _hf_config(rep, hf[0])
    else:
        rep.missing_deploy.append("HF config.json")
    _tokenizer_checks(rep, " (Megatron keeps none in the checkpoint)")
    rep.missing_deploy.append(f"consolidated weights (legacy checkpoint sharded TP={tp}, PP={pp}: run "
                              "`python -m post_training.ckpt consolidate`)")


def _analyse_dcp(rep: Report) -> None:
    rep.layout["format"] = "torch.distributed.checkpoint"
    _dcp_params(rep, _analyse_dcp_dir(rep, rep.lay.main))
    _dcp_shards(rep, rep.lay.main)
    rep.missing_deploy.append("config.json, tokenizer and consolidated weights (a raw DCP directory)")


# ----------------------------------------------------------------------------- DeepSpeed
def _analyse_deepspeed(rep: Report, in_trainer: bool = False) -> None:
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
    opt0 = L.peek_torch(first_opt) if first_opt and rep.files[first_opt]["pickle"] == "weights_only" else None
    if isinstance(opt0, dict) and isinstance(opt0.get("optimizer_state_dict"), dict):
        osd = opt0["optimizer_state_dict"]
        stage = int(osd["zero_stage"]) if osd.get("zero_stage") is not None else None
        partition = osd.get("partition_count")
    model_file = models.get(0) or zero3.get((0, 0))
    readable = model_file is not None and rep.files[model_file]["pickle"] == "weights_only"
    states = L.peek_torch(model_file) if readable else None
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
            _hf_config(rep, ds.parent / "config.json")
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
            rep.add_tensors({k: (v["shape"], v["dtype"]) for k, v in L.safetensors_header(p)[0].items()})


def _ds_dtype(states: dict) -> str:
    module = states.get("module")
    if isinstance(module, dict):
        for t in L.tensors_in(module).values():
            return str(t.dtype).replace("torch.", "")
    cfg = states.get("ds_config") or {}
    return "bfloat16" if (cfg.get("bf16") or {}).get("enabled") else \
        "float16" if (cfg.get("fp16") or {}).get("enabled") else "float32"


# ----------------------------------------------------------------------------- single files
def _analyse_gguf(rep: Report) -> None:
    p = rep.lay.main
    info = L.gguf_info(p)
    f = info["fields"]
    arch = f.get("general.architecture")
    rep.architecture = f"{arch} ({f['general.name']})" if arch and f.get("general.name") else arch
    for t in info["tensors"]:
        rep.params = (rep.params or 0) + t["n_elements"]
        rep.dtypes[t["type"]] += t["n_elements"]
    rep.layout.update(format=f"gguf v{f.get('GGUF.version')}", weight_files=1)
    has_tok = "tokenizer.ggml.model" in f
    rep.set_role(p, "weights+config+tokenizer" if has_tok else "weights+config", resume=False)
    rep.files[p]["detail"] = f"{len(info['tensors'])} tensors, {len(f)} metadata keys"
    if not has_tok:
        rep.missing_deploy.append("tokenizer (no tokenizer.ggml.* metadata)")
    if "tokenizer.chat_template" not in f:
        rep.notes.append("no chat template in the GGUF metadata")
    rep.missing_resume.append("training state (GGUF is an inference format: no optimizer, scheduler or RNG)")


def _analyse_file(rep: Report) -> None:
    p = rep.lay.main
    e = rep.files[p]
    rep.layout["format"] = "safetensors" if p.suffix == ".safetensors" else "torch"
    rep.layout["weight_files"] = 1
    if p.suffix == ".safetensors":
        tensors, meta = L.safetensors_header(p)
        rep.add_tensors({k: (v["shape"], v["dtype"]) for k, v in tensors.items()})
        e["detail"] = f"{len(tensors)} tensors" + (f", format={meta['format']}" if meta.get("format") else "")
        rep.set_role(p, "weights")
    elif e["pickle"] == "weights_only" or e["pickle_globals"] == ["argparse.Namespace"]:
        _torch_file_content(rep, p, L.peek_torch(p))
    else:
        why = ("legacy pickle format" if e["pickle"] == "legacy_unchecked"
               else f"needs pickle globals {_short(e['pickle_globals'])}")
        rep.unknown_params(f"{p.name} not read ({why})")
    rep.missing_resume.append("training state (a single file holds none)")
    rep.missing_deploy.append("config.json and tokenizer (a bare weights file); "
                              "`python -m post_training.ckpt to-safetensors` converts pickles safely")


def _torch_file_content(rep: Report, p: Path, obj: Any) -> None:
    """A single torch file: a plain state dict, a Megatron rank file or a DeepSpeed file."""
    obj = obj if isinstance(obj, dict) else {"": obj}
    if "ds_version" in obj or "optimizer_state_dict" in obj:
        rep.notes.append("a DeepSpeed checkpoint file; inspect its directory for the layout")
        weights = obj.get("module") or {}
    elif "checkpoint_version" in obj or "args" in obj:
        rep.notes.append("a Megatron rank file (one TP/PP shard); inspect its iteration directory")
        weights = {k: v for k, v in obj.items() if re.match(r"^model\d*$", k)}
    elif "state" in obj and "param_groups" in obj:
        rep.set_role(p, "optimizer state")
        rep.params = None
        return
    else:
        weights = obj
    tensors = _dedup(L.tensors_in(weights))
    rep.add_tensors(tensors)
    rep.files[p]["detail"] = f"{len(tensors)} tensors"
    rep.set_role(p, "weights" if tensors else "other")


_ANALYSERS: dict[str, Callable[[Report], None]] = {
    "toolkit-dist": _analyse_megatron_dist,
    "megatron-dist": _analyse_megatron_dist,
    "megatron-legacy": _analyse_megatron_legacy,
    "torch-dcp": _analyse_dcp,
    "hf-model": _analyse_hf,
    "peft-adapter": _analyse_peft,
    "hf-trainer": _analyse_trainer,
    "deepspeed": _analyse_deepspeed,
    "gguf": _analyse_gguf,
    "safetensors-file": _analyse_file,
    "torch-file": _analyse_file,
}


# ----------------------------------------------------------------------------- rendering
def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""


def _params_text(n: int | None) -> str:
    if n is None:
        return "unknown"
    scaled = next(((n / d, u) for d, u in ((1e9, "B"), (1e6, "M")) if n >= d), None)
    return f"{n:,}" + (f" ({scaled[0]:.2f}{scaled[1]})" if scaled else "")


def pickle_text(e: dict) -> str:
    """The PICKLE column: ``-`` (not a pickle), ``safe`` (weights_only), or what would run."""
    if e["pickle"] != "needs_globals":
        return _PICKLE_TEXT[e["pickle"]]
    g = e["pickle_globals"]
    if all(n.startswith("torch.distributed.checkpoint.") or n == "torch.serialization._get_layout"
           or (n.startswith("torch.") and n.count(".") == 1) for n in g):
        return "pickle.load: DCP classes only"  # DCP's .metadata, checked by the restricted reader
    text = "RUNS CODE: " + g[0]
    return text + (f" +{len(g) - 1} more" if len(g) > 1 else "")


def render(rep: dict) -> str:
    """The compact table (one line per file) and the summary block."""
    yn = {True: "yes", False: "no"}
    rows = [("FILE", "ROLE", "INFER", "RESUME", "EDIT", "PICKLE", "SIZE")]
    rows += [(e["path"], e["role"], yn[e["inference"]], yn[e["resume"]], yn[e["editable"]], pickle_text(e),
              human_bytes(e["bytes"])) for e in rep["files"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"{rep['path']}: {rep['description']}", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1].rjust(9) for r in rows]
    lay = rep["layout"]
    parts = [f"{k}={lay[k]}" for k in ("tp", "pp", "dp", "zero_stage", "ranks", "weight_files", "iteration")
             if lay.get(k) is not None]
    params = rep["parameters"]
    summary = [
        ("kind", rep["kind"]),
        ("architecture", rep["architecture"] or "unknown"),
        ("parameters", _params_text(params)),
        ("dtypes", ", ".join(f"{d} ({n:,})" for d, n in rep["dtypes"].items()) or "unknown"),
        ("total size", f"{human_bytes(rep['total_bytes'])} in {len(rep['files'])} files"),
        ("layout", f"{lay['format']}" + (": " + ", ".join(parts) if parts else "")),
    ]
    if rep["adapter"]:
        summary.append(("adapter", ", ".join(f"{k}={v}" for k, v in rep["adapter"].items())))
    for what in ("resume", "deploy"):
        miss = rep["missing"][what]
        summary.append((f"to {what}", "missing: " + "; ".join(miss) if miss else "nothing missing"))
    summary += [("PROBLEM", p) for p in rep["problems"]] + [("note", n) for n in rep["notes"]]
    lines.append("")
    lines += [f"{k:<13}{v}" for k, v in summary]
    return "\n".join(lines)
