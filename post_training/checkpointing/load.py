"""Loading megatron-core dist checkpoints: integrity, ModelOpt state, strict key/shape checks,
training state. Every problem a user can cause is reported as one ``UsageError`` line."""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch

from post_training.io import layout as cio
from post_training.runtime import Runtime
from post_training.runtime.collectives import rank0_then_share
from post_training.utils import UsageError, print_rank_0, unwrap


TRAINING_KEYS = ("optimizer.", "rng_state")
_GLU_LORA_B = re.compile(r"\.linear_fc1\.lora_b_[^.]+\.weight$")


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict, with ModelOpt LoRA's ``linear_fc1.lora_b_*`` of a gated MLP
    in the SwiGLU layout of ``linear_fc1.weight`` (global ``[gate_0..gate_n; up_0..up_n]``).
    ModelOpt 0.47's column-parallel LoRA plugin shards lora_b plainly on dim 0, i.e. globally as
    ``[gate_0; up_0; gate_1; up_1]`` at TP=2, which megatron's MLP (it wraps only ``weight`` and
    ``bias`` in the SwiGLU factory) leaves alone: reloaded at another TP, gate and up rows of the
    update swap (TP=2 -> TP=1: logits off by 2.3). A local transform, not a patch of the plugin:
    listed in the patch registry as ``lora_glu_sharding`` (post_training/runtime/fixes.py says why)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    sd = model.sharded_state_dict()
    if not getattr(getattr(unwrap(model), "config", None), "gated_linear_unit", False):
        return sd
    for k, v in sd.items():
        if isinstance(v, ShardedTensor) and _GLU_LORA_B.search(k):
            offsets = tuple((i, v.global_offset[i], v.axis_fragmentations[i]) for i in range(v.prepend_axis_num))
            sd[k] = apply_swiglu_sharded_factory(v, offsets)
    return sd


def _version_tuple(v: str) -> tuple:
    from packaging.version import Version

    return Version(v).release


def check_modelopt_version(iter_dir: Path) -> None:
    """Refuse a ModelOpt state written by a newer ModelOpt than the one installed."""
    import modelopt
    from megatron.core import dist_checkpointing

    state_dir = iter_dir / "modelopt_state"
    if not state_dir.is_dir():
        return
    saved = dist_checkpointing.load_common_state_dict(str(state_dir)).get("modelopt_version")
    if saved and _version_tuple(saved) > _version_tuple(modelopt.__version__):
        raise UsageError(
            f"checkpoint {iter_dir} holds ModelOpt state from nvidia-modelopt {saved}; the installed "
            f"{modelopt.__version__} is older and cannot restore it: upgrade nvidia-modelopt"
        )


def _sharded_tensors(sharded_sd) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {v.key: v for v in nested_values(sharded_sd) if isinstance(v, ShardedTensor)}


def check_shapes(model_sd, iter_dir: Path, meta: dict) -> None:
    """Name the first tensor whose global shape differs between model and checkpoint."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    for key, st in _sharded_tensors(model_sd).items():
        if key in saved and tuple(saved[key].global_shape) != tuple(st.global_shape):
            arch = meta.get("architecture")
            raise UsageError(
                f"checkpoint {iter_dir} does not fit this model{f' (saved from {arch})' if arch else ''}: "
                f"{key} is {tuple(saved[key].global_shape)} in the checkpoint, "
                f"{tuple(st.global_shape)} in the model"
            )


def _report_mismatch(missing: set[str], unexpected: set[str], strictness: str, iter_dir: Path) -> None:
    """megatron's 'unexpected' = requested but absent from the checkpoint (the model has it);
    its 'missing' = in the checkpoint, not requested."""
    if not missing and not unexpected:
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} model tensor(s) not in the checkpoint: {', '.join(sorted(unexpected)[:8])}")
    if missing:
        parts.append(f"{len(missing)} checkpoint tensor(s) not in the model: {', '.join(sorted(missing)[:8])}")
    msg = "; ".join(parts)
    if strictness == "raise_all":
        raise UsageError(f"checkpoint {iter_dir} does not match the model: {msg} "
                         f"(--dist-ckpt-strictness log_all loads the rest)")
    print_rank_0(f"warning: partial load from {iter_dir}: skipped {msg}")


def load_model_checkpoint(path: str | Path, model, rt: Runtime, *, strictness: str = "raise_all",
                          verify_hashes: bool = True) -> dict:
    """ModelOpt state, then weights, from a dist checkpoint at any TP/PP. Returns its meta."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    model = unwrap(model)
    iter_dir = cio.find_checkpoint(path)
    meta = cio.read_meta(iter_dir)
    if meta.get("modelopt_modes") and not (iter_dir / "modelopt_state").is_dir():
        raise UsageError(f"checkpoint {iter_dir} was saved with ModelOpt modes {meta['modelopt_modes']} "
                         f"but its modelopt_state/ is missing: the quantizers cannot be restored")
    rank0_then_share(lambda: cio.verify_files(iter_dir, meta, hashes=verify_hashes))
    rank0_then_share(lambda: check_modelopt_version(iter_dir))
    if "eagle" in meta.get("modelopt_modes", []):
        from post_training.runtime.te_standins import apply_standins

        apply_standins()  # restoring the mode re-builds the EAGLE module (TE classes without TE)
    if "medusa" in meta.get("modelopt_modes", []):
        from post_training.runtime.fixes import apply_medusa_fix

        apply_medusa_fix()  # restoring reads the heads' sharded state dict (see the entry)
    try:
        restore_sharded_modelopt_state([model], str(iter_dir))
        from post_training.quant_modules import disable_unsaved_output_layer_quantizers

        disable_unsaved_output_layer_quantizers(model, iter_dir)
        model_sd = model_sharded_state_dict(model)
        rank0_then_share(lambda: check_shapes(model_sd, iter_dir, meta))
        loaded, missing, unexpected = dist_checkpointing.load(
            {"model": model_sd}, str(iter_dir), strict=StrictHandling.RETURN_ALL)
    except UsageError:
        raise
    except Exception as e:  # unreadable shard, pickle error, ... (files verified above when recorded)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"could not read checkpoint {iter_dir}: {type(e).__name__}: {first}") from None
    # A training checkpoint also holds optimizer and RNG entries; they are not model tensors.
    missing = {k for k in missing if not k.startswith(TRAINING_KEYS)}
    _report_mismatch(missing, set(unexpected), strictness, iter_dir)
    result = model.load_state_dict(loaded["model"], strict=False)
    real_missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if real_missing and strictness == "raise_all":
        raise UsageError(f"checkpoint {iter_dir} left model tensors unset: {', '.join(real_missing[:8])}")
    print_rank_0(f"loaded {iter_dir} (saved at TP={meta.get('parallel', {}).get('tp', '?')} "
                 f"PP={meta.get('parallel', {}).get('pp', '?')}) at TP={rt.tp} PP={rt.pp}")
    return meta


# ----------------------------------------------------------------------------- training state


def rng_state() -> dict:
    """Every generator a training step draws from, on this rank."""
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded_object(rt: Runtime, data):
    """One RNG record per (PP, TP) position, replicated over DP, as Megatron-LM stores it."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", data, (rt.pp, rt.tp), (rt.pp_rank, rt.tp_rank),
                         replica_id=ps.get_data_parallel_rank())


def load_training_state(path: str | Path, model, rt: Runtime, optimizer=None, scheduler=None) -> dict:
    """Optimizer, scheduler, RNG and counters of a training checkpoint, after the model (and its
    ModelOpt state) was loaded and the optimizer built on it. Returns the saved train_state."""
    from megatron.core import dist_checkpointing

    model = unwrap(model)
    iter_dir = cio.find_checkpoint(path)
    meta = cio.read_meta(iter_dir)
    contents = meta.get("contents", {})
    if optimizer is not None and not contents.get("optimizer", True):
        raise UsageError(f"checkpoint {iter_dir} holds weights only: no optimizer state to resume from")
    request: dict[str, Any] = {}
    if optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sharded_state_dict(model), is_loading=True)
    same_layout = meta.get("parallel", {}).get("tp") == rt.tp and meta.get("parallel", {}).get("pp") == rt.pp
    if contents.get("rng") and same_layout:
        request["rng_state"] = rng_sharded_object(rt, None)
    loaded = dist_checkpointing.load(request, str(iter_dir))
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        try:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
        except AssertionError as e:  # megatron-core's check that the schedule flags are unchanged
            detail = str(e).replace("checkpointvalue", "checkpoint value").split(": ", 1)[-1]
            raise UsageError(f"the LR schedule of {iter_dir} differs from this run's ({detail}): pass "
                             "--override-opt-param-scheduler to use this run's flags, or "
                             "--use-checkpoint-opt-param-scheduler to keep the checkpoint's") from None
    if "rng_state" in request:
        set_rng_state(loaded["rng_state"][0])
    elif contents.get("rng"):
        print_rank_0("warning: RNG state not restored: the checkpoint was saved at another TP/PP")
    return dict(loaded.get("train_state", {}))
