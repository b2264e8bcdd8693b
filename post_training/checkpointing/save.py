"""Saving megatron-core dist checkpoints with ModelOpt state, in Megatron-LM's layout.

Save order: ModelOpt's global state (``modelopt_state/``) and the sharded model (per-module
ModelOpt state rides in each module's ``_extra_state``, so it reshards with the weights), then
optimizer / scheduler / RNG when given. The files on disk (tracker, record, atomic commit) are
:mod:`post_training.io.layout`'s; loading is :mod:`post_training.checkpointing.load`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from post_training import __version__
from post_training.checkpointing.load import model_sharded_state_dict, rng_sharded_object, rng_state
from post_training.config import EMBEDDED_MODEL
from post_training.io import layout as cio
from post_training.io.atomic import staged_dir
from post_training.io.hf_files import copy_aux_files
from post_training.runtime import Runtime
from post_training.runtime.collectives import broadcast_object
from post_training.utils import print_rank_0, rank, unwrap

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current checkpoint_version


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
    with staged_dir(dest, overwrite=False) as tmp:
        copy_aux_files(Path(hf_dir), tmp)


def save_checkpoint(model, rt: Runtime, save_dir: str | Path, iteration: int | None, *,
                    hf_dir: Path | None = None, model_conf: str = EMBEDDED_MODEL,
                    optimizer=None, scheduler=None, train_state: dict | None = None,
                    keep_last: int | None = None) -> Path:
    """Save this rank's share of the model (and training state) as one Megatron-LM style
    iteration of ``save_dir`` (``iteration=None`` saves ``release``). Collective."""
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    model = unwrap(model)
    root = Path(save_dir)
    name = cio.iter_dir_name(iteration)
    staging = None
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        cio.remove_stale_staging(root)
        _save_hf_config(hf_dir, root)
        staging = str(cio.new_staging_dir(root, name))
        Path(staging).mkdir()
    staging = Path(broadcast_object(staging))
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
        final = cio.commit(staging, root, iteration)  # fsyncs, renames, then moves the tracker
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


