"""``inspect`` analysers for Hugging Face side layouts and single files.

Model directories (safetensors or torch ``.bin``, sharded or not), PEFT adapters, Trainer
``checkpoint-N`` directories (their DeepSpeed part goes to :mod:`post_training.checkpointing.tools.inspect_sharded`),
GGUF files, and single safetensors / torch files. Each fills a
:class:`~post_training.checkpointing.tools.inspect_report.Report`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from post_training.checkpointing.tools import inspect_readers as R
from post_training.checkpointing.tools.inspect_report import Report, dedup, hf_config, read_json, short, tokenizer_checks
from post_training.checkpointing.tools.inspect_sharded import analyse_deepspeed


def _count_weight_files(rep: Report, roles: tuple[str, ...] = ("weights", "adapter weights")) -> None:
    """Parameters and dtypes from safetensors headers and weights_only torch loads."""
    files = [p for p in rep.of_role(*roles) if p.suffix != ".gguf"]
    rep.layout["weight_files"] = len(files)
    for p in files:
        e = rep.files[p]
        if p.suffix == ".safetensors":
            tensors, _ = R.safetensors_header(p)
            rep.add_tensors({k: (v["shape"], v["dtype"]) for k, v in tensors.items()})
            e["detail"] = f"{len(tensors)} tensors"
        elif e["pickle"] == "weights_only":
            tensors = dedup(R.tensors_in(R.peek_torch(p)))
            rep.add_tensors(tensors)
            e["detail"] = f"{len(tensors)} tensors"
        else:
            rep.unknown_params(f"{e['path']} is not read (loading it could run pickle code)")
            return



def _check_index(rep: Report) -> None:
    for idx in rep.of_role("weights index"):
        shards = set(read_json(idx).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (idx.parent / s).is_file())
        for s in missing:
            rep.problems.append(f"{idx.name} lists {s}, which is missing")
            rep.missing_deploy.append(f"weight shard {s}")
        rep.layout["weight_files"] = len(shards)



_TRAINING_STATE = "training state (optimizer, scheduler, RNG): a model export, not a training checkpoint"


def analyse_hf(rep: Report) -> None:
    rep.layout["format"] = "safetensors" if rep.of_role("weights") and all(
        p.suffix == ".safetensors" for p in rep.of_role("weights")) else "torch"
    cfg = rep.lay.main / "config.json"
    if not cfg.is_file():
        rep.missing_deploy.append("config.json")
    hf_config(rep, cfg)
    _count_weight_files(rep)
    _check_index(rep)
    tokenizer_checks(rep)
    rep.missing_resume.append(_TRAINING_STATE)


def _adapter(rep: Report, path: Path) -> dict:
    cfg = read_json(path)
    rep.adapter = {"peft_type": cfg.get("peft_type"), "base_model": cfg.get("base_model_name_or_path"),
                   "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
                   "target_modules": cfg.get("target_modules")}
    return cfg


def analyse_peft(rep: Report) -> None:
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


def analyse_trainer(rep: Report) -> None:
    main = rep.lay.main
    state = read_json(main / "trainer_state.json")
    rep.layout["iteration"] = state.get("global_step")
    rep.layout["format"] = "safetensors"
    if (main / "adapter_config.json").is_file():
        hf_config(rep, main / "config.json")
        _adapter(rep, main / "adapter_config.json")
    elif not hf_config(rep, main / "config.json"):
        rep.missing_deploy.append("config.json")
    rng = sorted(p.name for p in rep.of_role("RNG"))
    rep.layout["ranks"] = len(rng) or None
    if rep.lay.deepspeed_dir is not None:
        analyse_deepspeed(rep, in_trainer=True)
    else:
        _count_weight_files(rep, ("weights", "adapter weights"))
        _check_index(rep)
        for name, what in (("optimizer.pt", "optimizer state (optimizer.pt)"),
                           ("scheduler.pt", "scheduler state (scheduler.pt)")):
            if not (main / name).is_file():
                rep.missing_resume.append(what)
    if not rng:
        rep.missing_resume.append("RNG state (rng_state*.pth): resume works, but not bit-exact")
    tokenizer_checks(rep, " (the Trainer saved none: copy it from the base model)")



# ----------------------------------------------------------------------------- single files
def analyse_gguf(rep: Report) -> None:
    p = rep.lay.main
    info = R.gguf_info(p)
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


def analyse_file(rep: Report) -> None:
    p = rep.lay.main
    e = rep.files[p]
    rep.layout["format"] = "safetensors" if p.suffix == ".safetensors" else "torch"
    rep.layout["weight_files"] = 1
    if p.suffix == ".safetensors":
        tensors, meta = R.safetensors_header(p)
        rep.add_tensors({k: (v["shape"], v["dtype"]) for k, v in tensors.items()})
        e["detail"] = f"{len(tensors)} tensors" + (f", format={meta['format']}" if meta.get("format") else "")
        rep.set_role(p, "weights")
    elif e["pickle"] == "weights_only" or e["pickle_globals"] == ["argparse.Namespace"]:
        _torch_file_content(rep, p, R.peek_torch(p))
    else:
        why = ("legacy pickle format" if e["pickle"] == "legacy_unchecked"
               else f"needs pickle globals {short(e['pickle_globals'])}")
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
    tensors = dedup(R.tensors_in(weights))
    rep.add_tensors(tensors)
    rep.files[p]["detail"] = f"{len(tensors)} tensors"
    rep.set_role(p, "weights" if tensors else "other")
