"""Loading and saving models: HF import, and megatron-core dist checkpoints with ModelOpt state.

Save order: ModelOpt's global state (``modelopt_state/``) and the sharded model (per-module
ModelOpt state rides in each module's ``_extra_state``, so it reshards with the weights), then
optimizer / scheduler / RNG when given. Load order: ModelOpt state first (it adds modules and
parameters: quantizers, speculative heads), then weights, then, once the caller has built the
optimizer on the restored model, the training state (:func:`load_training_state`).
Filesystem layout and atomicity live in :mod:`post_training.checkpoint_io`.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from post_training import __version__, checkpoint_io as cio, hf
from post_training.checkpoint_load import (
    load_model_checkpoint,
    load_training_state,
    model_sharded_state_dict,
    rng_sharded_object,
    rng_state,
)
from post_training.model_builder import ModelConfig, build_model, check_parallel, import_hf_weights
from post_training.runtime import ParallelConfig, Runtime
from post_training.utils import UsageError, print_rank_0, rank, unwrap

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version
STRICTNESS = ("raise_all", "log_all")


@dataclass(kw_only=True)
class SourceConfig:
    """Where the model comes from and goes to. Script env: HF_MODEL_CKPT ->
    --pretrained-model-path, MLM_MODEL_CKPT -> --load, MLM_MODEL_SAVE -> --save,
    EXPORT_DIR -> --export-dir."""

    model_conf: str = hf.EMBEDDED_MODEL
    pretrained_model_path: str | None = None
    load: str | None = None
    save: str | None = None
    export_dir: str | None = None
    export_quant_cfg: str | None = None
    export_kd_teacher_load: str | None = None
    strictness: str = "raise_all"  # --dist-ckpt-strictness: raise_all | log_all (partial load)
    verify_hashes: bool = True
    keep_last: int | None = None

    def __post_init__(self) -> None:
        if self.strictness not in STRICTNESS:
            raise UsageError(f"--dist-ckpt-strictness must be one of {STRICTNESS}")
        if self.keep_last is not None and self.keep_last < 1:
            raise UsageError(f"--keep-last-checkpoints must be >= 1 (got {self.keep_last})")

    def validate(self, par: ParallelConfig) -> hf.ModelConf:
        """Cheap checks that need no process group (run before torchrun starts ranks)."""
        conf = hf.load_conf(self.model_conf)
        shape = dict(conf.expect)
        if self.pretrained_model_path:
            shape = json.loads((hf.check_hf_dir(self.pretrained_model_path) / "config.json").read_text())
        if self.load:
            if self.load_kind() == "dist":
                cfg = cio.find_checkpoint(self.load).parent / cio.HF_CONFIG_DIR / "config.json"
                if cfg.is_file():
                    shape = json.loads(cfg.read_text())
            else:
                shape = json.loads((Path(self.load) / "config.json").read_text())
        if {"num_attention_heads", "num_hidden_layers"} <= shape.keys():
            check_parallel(SimpleNamespace(**shape), par.tp, par.pp)
        return conf

    def load_kind(self) -> str:
        """'hf' for an HF directory (HF import), 'dist' for a dist checkpoint (root or iter dir)."""
        p = Path(self.load)
        if not p.exists():
            raise UsageError(f"--load path not found: {p}")
        if (p / "config.json").is_file() and not cio.is_checkpoint_root(p):
            return "hf"
        cio.find_checkpoint(p)
        return "dist"


# ----------------------------------------------------------------------------- HF sources


def resolve_hf_dir(src: SourceConfig) -> Path:
    """The HF directory (config + tokenizer, and weights unless a dist checkpoint is loaded).
    Rank 0 materializes the embedded model; the others wait for it."""
    kind = src.load_kind() if src.load else None
    if kind == "dist":
        saved = cio.find_checkpoint(src.load).parent / cio.HF_CONFIG_DIR
        if saved.is_dir():
            return saved
    conf = hf.load_conf(src.model_conf)
    path = src.load if kind == "hf" else src.pretrained_model_path
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return hf.resolve_hf_dir(conf, path)
    out = hf.resolve_hf_dir(conf, path)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def setup_model(src: SourceConfig, mcfg: ModelConfig, rt: Runtime,
                inference: bool = True) -> tuple[Any, Any, Any]:
    """Build this rank's model stage and fill it from ``--load`` (dist checkpoint or HF dir)
    or the HF model. Returns (model, tokenizer, hf_config).

    ``inference`` freezes the weights: megatron's linear layers then take their frozen-weight
    path, which skips gradient bookkeeping (about 6% of a CPU decode step on SmolLM2)."""
    from transformers import AutoConfig

    hf_dir = resolve_hf_dir(src)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    # The default conf with another HF dir means "use that model"; a named conf must match it.
    explicit = src.pretrained_model_path or src.load
    if not (explicit and src.model_conf == hf.EMBEDDED_MODEL):
        hf.check_expected(hf.load_conf(src.model_conf), hf_config)
    model = build_model(hf_config, rt, mcfg)
    if src.load and src.load_kind() == "dist":
        load_model_checkpoint(src.load, model, rt, strictness=src.strictness,
                              verify_hashes=src.verify_hashes)
    else:
        import_hf_weights(model, hf_dir, mcfg.torch_dtype)
    model.eval()
    if inference:
        model.requires_grad_(False)
    return model, load_tokenizer(hf_dir), hf_config


# ----------------------------------------------------------------------------- saving


def _modelopt_modes(model) -> list[str]:
    import modelopt.torch.opt as mto

    if not mto.ModeloptStateManager.is_converted(model):
        return []
    return [name for name, _ in mto.modelopt_state(model)["modelopt_state_dict"]]


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"post_training": __version__}
    for pkg in ("torch", "megatron-core", "nvidia-modelopt", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _save_hf_config(hf_dir: Path | None, root: Path) -> None:
    """config.json + tokenizer beside the iterations, so --load needs no HF directory."""
    dest = root / cio.HF_CONFIG_DIR
    if hf_dir is None or dest.is_dir() or Path(hf_dir).resolve() == dest.resolve():
        return
    tmp = cio.new_staging_dir(root, "release")
    tmp.mkdir()
    for p in Path(hf_dir).iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".bin", ".pt", ".gguf")) \
                and p.name != "model.safetensors.index.json":
            shutil.copy2(p, tmp / p.name)
    shutil.move(str(tmp), str(dest))


def save_checkpoint(model, rt: Runtime, save_dir: str | Path, iteration: int | None, *,
                    hf_dir: Path | None = None, model_conf: str = hf.EMBEDDED_MODEL,
                    optimizer=None, scheduler=None, train_state: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Save this rank's share of the model (and training state) as one Megatron-LM style
    iteration of ``save_dir`` (``iteration=None`` saves ``release``). Collective."""
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    model = unwrap(model)
    root = Path(save_dir)
    name = cio.iter_dir_name(iteration)
    box = [None]
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        cio.remove_stale_staging(root)
        _save_hf_config(hf_dir, root)
        box = [str(cio.new_staging_dir(root, name))]
        Path(box[0]).mkdir()
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    staging = Path(box[0])
    t0 = time.perf_counter()

    model_sd = model_sharded_state_dict(model)
    state: dict[str, Any] = {"model": model_sd, "checkpoint_version": CHECKPOINT_VERSION,
                             "iteration": iteration if iteration is not None else 0}
    contents = {"weights": True, "optimizer": optimizer is not None,
                "scheduler": scheduler is not None, "rng": train_state is not None}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if train_state is not None:
        state["train_state"] = dict(train_state)
        state["rng_state"] = rng_sharded_object(rt, [rng_state()])
    dist_checkpointing.save(state, str(staging))
    # After the main save: megatron-core warns about (and would clear) a non-empty target dir.
    save_sharded_modelopt_state([model], staging)
    if dist.is_initialized():
        dist.barrier()
    if rank() == 0:
        meta = {
            "format": "megatron-core dist checkpoint (torch_dist), Megatron-LM layout",
            "iteration": iteration if iteration is not None else "release",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_conf": model_conf,
            "architecture": _architecture(hf_dir),
            "parallel": {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "world_size": rt.world_size},
            "dtype": str(model.config.params_dtype).replace("torch.", ""),
            "modelopt_modes": _modelopt_modes(model),
            "contents": contents,
            "train_state": dict(train_state or {}),
            "libraries": _library_versions(),
        }
        cio.write_meta(staging, meta)
        cio.fsync_tree(staging)
        final = cio.commit(staging, root, iteration)
        if keep_last:
            for p in cio.rotate(root, keep_last):
                print_rank_0(f"removed old checkpoint {p.name} (keep last {keep_last})")
        print_rank_0(f"saved {final} in {time.perf_counter() - t0:.1f}s")
    if dist.is_initialized():
        dist.barrier()
    return root / name


def _architecture(hf_dir: Path | None) -> str | None:
    if hf_dir is None or not (Path(hf_dir) / "config.json").is_file():
        return None
    return (json.loads((Path(hf_dir) / "config.json").read_text()).get("architectures") or [None])[0]


__all__ = ["SourceConfig", "setup_model", "save_checkpoint", "load_model_checkpoint",
           "load_training_state", "resolve_hf_dir", "load_tokenizer"]
