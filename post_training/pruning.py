"""Minitron pruning (ModelOpt ``mcore_minitron``) of the toolkit's GPTModel, with a calibration
forward loop, and the HF config that records the pruned architecture.

Minitron ranks what to keep from activations of a calibration forward: decoder layers by
``1 - cos(input, output)`` of each layer (depth), hidden channels by the norms' outputs, FFN
channels by ``linear_fc2``'s input and query heads (within each KV group) by ``linear_proj``'s
input; then it cuts every layer to the targets. Like Megatron-LM's prune.py it runs at TP=1
(PP allowed), asks for exact targets (divisors of 1: the user's sizes are the sizes) and drops
the ModelOpt state afterwards: the pruned model is an ordinary, smaller model.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from post_training.utils import UsageError

# megatron TransformerConfig name -> HF config name, for every target PruneConfig accepts
HF_NAMES = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
            "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
            "num_query_groups": "num_key_value_heads"}


def model_sizes(hf_config: Any) -> dict[str, int]:
    """The model's current value of each prunable size (from its HF config or config.json)."""
    get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
    sizes = {k: get(hf) for k, hf in HF_NAMES.items()}
    if sizes["num_query_groups"] is None:
        sizes["num_query_groups"] = sizes["num_attention_heads"]
    return sizes


def check_targets(targets: dict[str, int], hf_config: Any) -> dict[str, int]:
    """The export_config ModelOpt gets for ``targets`` (``--prune-export-config``) on a model of
    ``hf_config``; a target the model cannot be pruned to is a UsageError. Needs no megatron."""
    have = model_sizes(hf_config)
    for key, want in targets.items():
        if want > have[key]:
            raise UsageError(f"--prune-export-config {key}={want} is larger than the model's "
                             f"{key} ({have[key]}): pruning only removes")
    groups = have["num_query_groups"]
    if targets.get("num_query_groups", groups) != groups:
        raise UsageError(f"--prune-export-config num_query_groups={targets['num_query_groups']}: "
                         f"ModelOpt {_modelopt_version()} does not prune KV heads (it keeps all "
                         f"{groups} query groups and prunes query heads within each); leave it out")
    heads = targets.get("num_attention_heads", have["num_attention_heads"])
    if heads % groups:
        raise UsageError(f"--prune-export-config num_attention_heads={heads} is not a multiple of "
                         f"num_query_groups ({groups}): every KV group keeps the same number of "
                         f"query heads")
    return {k: v for k, v in targets.items() if k != "num_query_groups"}


def _modelopt_version() -> str:
    from importlib.metadata import version

    return version("nvidia-modelopt")


def param_count(model) -> int:
    """Parameters of the whole model, every pipeline stage, tied embeddings once. Collective."""
    from post_training.runtime.collectives import gather_objects
    from post_training.runtime import get_runtime

    rt = get_runtime()
    # a later stage's copy of tied embeddings is the first stage's weight again
    copy = "output_layer.weight" if (getattr(model, "share_embeddings_and_output_weights", False)
                                     and not rt.is_first_stage) else None
    mine = sum(p.numel() for n, p in model.named_parameters() if n != copy)
    parts = gather_objects((rt.tp_rank, rt.dp_rank, mine))
    return sum(n for tp, dp, n in parts if tp == 0 and dp == 0)


@dataclass
class PruneResult:
    """What pruning did; the perplexities are filled in by the caller."""

    export_config: dict[str, int]
    before: dict[str, int]  # sizes before
    after: dict[str, int]  # sizes after
    params_before: int
    params_after: int
    layer_scores: dict[int, float]  # 1-indexed layer -> importance (higher: kept first)
    dropped: list[int]  # 1-indexed layers removed (depth pruning)
    seconds: float
    ppl_before: float | None = None
    ppl_after: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def kept(self) -> list[int]:
        return [n for n in sorted(self.layer_scores) if n not in self.dropped]


def _sizes(cfg) -> dict[str, int]:
    return {k: int(getattr(cfg, k)) for k in HF_NAMES}


def prune_model(model, export_config: dict[str, int], loop: Callable[[Any], None]) -> PruneResult:
    """Prune ``model`` (this rank's stage of an unwrapped GPTModel at TP=1) in place to
    ``export_config`` (from :func:`check_targets`), ranking by ``loop``'s calibration forward.
    Collective over the pipeline stages."""
    import modelopt.torch.opt as mto
    import modelopt.torch.prune as mtp

    from post_training.runtime import patches

    if mto.ModeloptStateManager.is_converted(model):
        # the state removed after pruning would take e.g. quantization with it
        modes = [m for m, _ in mto.modelopt_state(model)["modelopt_state_dict"]]
        raise UsageError(f"the model carries ModelOpt state ({', '.join(modes)}): prune the "
                         "plain model, then quantize / distill the pruned one")
    # ModelOpt's Minitron needs these on the local layer spec / without TE / over gloo
    # (post_training/runtime/minitron.py); on demand, so other tasks do not import the plugin.
    patches.apply(*patches.group("minitron"))
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    before, params_before = _sizes(model.config), param_count(model)
    t0 = time.perf_counter()
    # Divisors of 1: ModelOpt's defaults (hidden 256, ffn 512, layers 2) would refuse exact
    # targets such as 30 -> 15 layers; the targets were checked against the model already.
    mode_cfg = get_mcore_minitron_config(hidden_size_divisor=1, ffn_hidden_size_divisor=1,
                                         num_layers_divisor=1)
    _, state = mtp.prune(model, mode=[("mcore_minitron", mode_cfg)],
                         constraints={"export_config": dict(export_config)}, dummy_input=None,
                         config={"forward_loop": loop})
    seconds = time.perf_counter() - t0
    # The pruned model is homogeneous: nothing of the search space needs restoring later.
    if mto.ModeloptStateManager.is_converted(model):
        mto.ModeloptStateManager.remove_state(model)
    scores = {int(k): float(v) for k, v in (state.get("layer_scores") or {}).items()}
    kept_n = export_config.get("num_layers", before["num_layers"])
    ranked = state.get("sorted_layers") or []
    dropped = sorted(int(n) for n in ranked[kept_n:])
    return PruneResult(export_config=dict(export_config), before=before, after=_sizes(model.config),
                       params_before=params_before, params_after=param_count(model),
                       layer_scores=scores, dropped=dropped, seconds=seconds)


def pruned_hf_config(model_config, before: dict[str, int]) -> dict[str, Any]:
    """config.json changes that describe the pruned model to every loader (model_builder, HF
    export, transformers). head_dim is explicit: hidden_size / heads no longer gives it.
    ``pruned_from`` keeps the sizes before (HF names), so a model conf still recognises it."""
    out: dict[str, Any] = {HF_NAMES[k]: v for k, v in _sizes(model_config).items()}
    out["head_dim"] = int(model_config.kv_channels)
    out["pruned_from"] = {HF_NAMES[k]: v for k, v in before.items() if v != out[HF_NAMES[k]]}
    return out


def save_pruned(model, rt, save_dir: str | Path, hf_dir: Path, before: dict[str, int], *,
                model_conf: str, keep_last: int | None = None) -> Path:
    """Save the pruned model as a normal checkpoint. Its ``hf_config/`` (config + tokenizer of
    ``hf_dir``, the pruned sizes stated) is written first, and save_checkpoint keeps an existing
    one: there is no moment with pruned weights beside the old shapes. ``before``: the sizes
    before pruning (:attr:`PruneResult.before`; an earlier ``pruned_from`` is kept). Collective."""
    import torch.distributed as dist

    from post_training.checkpointing import save_checkpoint
    from post_training.io import layout as cio
    from post_training.io.atomic import staged_dir
    from post_training.io.hf_files import copy_aux_files, update_config
    from post_training.utils import rank

    root = Path(save_dir)
    dest = root / cio.HF_CONFIG_DIR
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        source = json.loads((Path(hf_dir) / "config.json").read_text())
        changes = pruned_hf_config(model.config, before)
        changes["pruned_from"] = {**changes["pruned_from"], **source.get("pruned_from", {})}
        if dest.resolve() != Path(hf_dir).resolve():
            with staged_dir(dest, overwrite=True, what="hf_config dir") as tmp:
                copy_aux_files(Path(hf_dir), tmp)
                update_config(tmp, None, **changes)
        else:  # a checkpoint pruned again into itself: its own config gets the new sizes
            update_config(dest, None, **changes)
    if dist.is_initialized():
        dist.barrier()
    return save_checkpoint(model, rt, root, None, hf_dir=dest, model_conf=model_conf,
                           keep_last=keep_last)
