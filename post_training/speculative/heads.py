"""Draft heads trained on a frozen target: ModelOpt speculative decoding (``mtsp.convert``) on the
megatron-core GPTModel through ModelOpt's megatron plugins (``plugins/megatron_eagle.py``,
``plugins/megatron_medusa.py``), on CPU with the TE stand-ins of
:mod:`post_training.runtime.te_standins`.

* :func:`convert_model` attaches the head: EAGLE-3 (``EAGLE3_DEFAULT_CFG`` with the draft layer
  sized from the target's HF config), EAGLE-1 (ModelOpt's default EAGLE config: no aux hidden
  states, no fc) or Medusa. The plugin freezes every target parameter (``requires_grad=False``
  before the DDP wrap: megatron-core's DDP gives them no gradient buffer and the optimizer no
  state); only the head's parameters train. Online training: each forward runs the target, and
  the draft's loss reads the target's hidden states and logits of that same forward.
* :func:`calibrate_d2t`: ``--draft-vocab-size N`` keeps the N most frequent tokens of the training
  data (ModelOpt's HF recipe; its megatron path leaves ``d2t`` zero). ``target_id = draft_id +
  d2t[draft_id]``; the plugin's loss is then the KL to the target's logits at those N ids,
  softmax-renormalised over them (``logits_kld_loss`` with the mapping).
* :func:`prepare_for_training`: per-term loss reporting (each TTT step's loss and top-1
  agreement with the target / each Medusa head's loss by name, read by
  :func:`post_training.loss_func.loss_func`) and one correctness fix: megatron's
  vocab-parallel cross entropy works in place on fp32 logits, and the EAGLE forward computes the
  (zero-weighted) base LM loss on the very logits it then distils from; fp32 logits are cloned
  first (bf16 ones are copied by its ``.float()`` anyway). Instance attributes of the converted
  model, as :mod:`post_training.distillation` does; nothing upstream changes.
* :func:`init_from_target` (``--draft-init-from-target``): a warm start. Medusa as its paper
  does it (each head's lm_head a copy of the target's, its residual blocks zero, so every head
  starts as the target's next-token head); EAGLE's draft lm_head from the target's rows of the
  draft vocabulary and its final norm from the target's. ModelOpt starts both from random.
* :func:`draft_kind` reads the ModelOpt state: a ``--load`` of a saved draft re-creates the head
  (the checkpoint load applies the stand-ins first, see checkpointing/load.py).
"""
from __future__ import annotations

import copy
import json
from types import MethodType
from typing import Any, Iterable

import torch

from post_training.config import DraftTrainConfig
from post_training.utils import UsageError, print_rank_0

SPEC_MODES = ("eagle", "medusa")
TERMS_ATTR = "_pt_draft_terms"  # [(name, per-token loss [b, s] detached, first position)]


def _hf(hf_config: Any, key: str, default: Any = None) -> Any:
    return hf_config.get(key, default) if isinstance(hf_config, dict) else getattr(hf_config, key, default)


def target_shape(hf_config: Any) -> tuple[int, int]:
    """(number of layers, vocabulary size) of the target."""
    return int(_hf(hf_config, "num_hidden_layers")), int(_hf(hf_config, "vocab_size"))


def eagle_architecture(cfg: DraftTrainConfig, hf_config: Any, dtype: torch.dtype) -> dict:
    """ModelOpt's ``eagle_architecture_config``: its default for the algorithm, the draft layer
    sized like one target layer (ModelOpt's megatron default is Llama-3-8B's), the target's rope,
    then ``--eagle-config`` overrides. ``hidden_size`` and ``vocab_size`` come from the target."""
    from modelopt.torch.speculative import config as mcfg

    arch = copy.deepcopy(mcfg.eagle3_default_config if cfg.algorithm == "eagle3"
                         else mcfg.default_eagle_config)
    heads = int(_hf(hf_config, "num_attention_heads"))
    theta = _hf(hf_config, "rope_theta") or (_hf(hf_config, "rope_parameters") or {}).get("rope_theta", 10000.0)
    rope = _hf(hf_config, "rope_scaling") or {"rope_type": "default", "rope_theta": theta}
    arch.update(
        torch_dtype=str(dtype).removeprefix("torch."),
        num_hidden_layers=cfg.eagle_num_layers,
        intermediate_size=int(_hf(hf_config, "intermediate_size")),
        num_attention_heads=heads,
        num_key_value_heads=int(_hf(hf_config, "num_key_value_heads", heads)),
        head_dim=int(_hf(hf_config, "head_dim", None) or _hf(hf_config, "hidden_size") // heads),
        rms_norm_eps=float(_hf(hf_config, "rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=rope,
    )
    if cfg.algorithm == "eagle3" and cfg.aux_layer_ids is not None:
        # the plugin concatenates the aux states in layer order: list them in that order
        arch["eagle_aux_hidden_state_layer_ids"] = sorted(set(cfg.aux_layer_ids))
    if cfg.draft_vocab_size is not None:
        arch["draft_vocab_size"] = cfg.draft_vocab_size
    if cfg.eagle_config:
        try:
            extra = json.loads(open(cfg.eagle_config).read())
        except ValueError as e:
            raise UsageError(f"--eagle-config {cfg.eagle_config} is not json: {e}") from None
        if not isinstance(extra, dict):
            raise UsageError(f"--eagle-config {cfg.eagle_config} must be a json object")
        arch.update(extra)
    return arch


def convert_spec(cfg: DraftTrainConfig, hf_config: Any, dtype: torch.dtype) -> list:
    """The ``mtsp.convert`` mode list for ``cfg``."""
    if cfg.algorithm == "medusa":
        return [("medusa", {"medusa_num_heads": cfg.medusa_num_heads,
                            "medusa_num_layers": cfg.medusa_num_layers})]
    return [("eagle", {"eagle_architecture_config": eagle_architecture(cfg, hf_config, dtype),
                       "eagle_ttt_steps": cfg.eagle_ttt_steps,
                       "eagle_report_acc": False})]  # it prints a tensor list on every eval forward


def draft_kind(model) -> str | None:
    """'eagle' / 'medusa' when the model (possibly wrapped) carries a ModelOpt speculative mode."""
    import modelopt.torch.opt as mto

    model = _unwrap(model)
    if not mto.ModeloptStateManager.is_converted(model):
        return None
    modes = [m for m, _ in mto.modelopt_state(model)["modelopt_state_dict"]]
    return next((m for m in modes if m in SPEC_MODES), None)


def convert_model(model, cfg: DraftTrainConfig, hf_config: Any, rt, d2t: torch.Tensor | None = None,
                  seed: int = 1234):
    """Attach the draft head to this rank's target (built by ``setup_model(inference=False)``,
    not DDP-wrapped). Returns the converted model; the target is frozen. ``seed``: the head's
    initial weights (the same on every TP rank)."""
    import modelopt.torch.speculative as mtsp

    from post_training.runtime.te_standins import apply_standins

    num_layers, vocab = target_shape(hf_config)
    cfg.check_target(num_layers, vocab)
    if rt.pp > 1:
        raise UsageError("draft-head training needs PP=1 (ModelOpt's megatron EAGLE/Medusa plugins "
                         "support pipeline parallelism for export only); use TP")
    if cfg.draft_vocab_size is not None and cfg.draft_vocab_size % rt.tp:
        raise UsageError(f"--draft-vocab-size {cfg.draft_vocab_size} must be divisible by TP={rt.tp}")
    apply_standins()
    if cfg.algorithm == "medusa":
        from post_training.runtime.fixes import apply_medusa_fix

        apply_medusa_fix()  # its checkpoints save and load only with it
    dtype = next(model.parameters()).dtype
    from post_training.runtime.dist import seed_everything

    seed_everything(seed)  # replicated head weights (fc, norms) must start equal on every TP rank
    model = mtsp.convert(model, convert_spec(cfg, hf_config, dtype))
    if d2t is not None:
        set_d2t(model, d2t)
    if cfg.init_from_target:  # after d2t: EAGLE's rows follow the draft vocabulary
        print_rank_0(f"--draft-init-from-target: {init_from_target(model, rt)}")
    return model


@torch.no_grad()
def init_from_target(model, rt) -> str:
    """The warm start of the module docstring, on a freshly converted (not loaded) model; the
    same on every TP rank. Returns what was copied, for the log."""
    from megatron.core import parallel_state as ps

    model = _unwrap(model)
    target_w = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
                else model.output_layer.weight)  # [vocab / TP, h], this rank's rows
    if hasattr(model, "medusa_heads"):
        for head in model.medusa_heads:
            head.lm_head.weight.copy_(target_w)  # the same vocab-parallel split
            for layer in head.medusa_layers:
                layer.linear.weight.zero_()
                if layer.linear.bias is not None:
                    layer.linear.bias.zero_()
        return f"{len(model.medusa_heads)} Medusa heads start as the target's lm_head"
    module = model.eagle_module
    norm = getattr(module.decoder, "final_layernorm", None)
    if norm is not None:
        norm.weight.copy_(model.decoder.final_layernorm.weight)
    out = getattr(module, "eagle_output_layer", None)
    if out is None:  # the draft reads the target's own output layer
        return "EAGLE final norm from the target (it shares the target's lm_head)"
    full = target_w
    if rt.tp > 1:
        parts = [torch.empty_like(target_w) for _ in range(rt.tp)]
        torch.distributed.all_gather(parts, target_w.contiguous(), group=ps.get_tensor_model_parallel_group())
        full = torch.cat(parts)
    n, rank = out.weight.shape[0], ps.get_tensor_model_parallel_rank()  # this rank's draft rows
    ids = torch.arange(n * rank, n * (rank + 1))
    if hasattr(module, "d2t"):
        ids = ids + module.d2t.cpu()[ids]
    out.weight.copy_(full[ids.to(full.device)])
    return "EAGLE lm_head from the target's rows of the draft vocabulary, final norm from the target's"


# ----------------------------------------------------------------------------- draft vocabulary


def count_tokens(samples: Iterable[dict], vocab_size: int) -> torch.Tensor:
    """Token frequencies ``[vocab_size]`` over the ``tokens`` of the samples (chat_data's)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in samples:
        ids = s["tokens"].reshape(-1).to(torch.int64)
        counts += torch.bincount(ids[ids < vocab_size], minlength=vocab_size)
    return counts


def calibrate_d2t(counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """``d2t`` for the ``draft_vocab_size`` most frequent ids (ties: the lower id), kept in id
    order: ``target_id = draft_id + d2t[draft_id]``. Tokens the data never shows are taken in id
    order when the data has fewer distinct tokens than N."""
    if not 1 <= draft_vocab_size <= counts.numel():
        raise UsageError(f"--draft-vocab-size {draft_vocab_size} must be in 1..{counts.numel()}")
    order = sorted(range(counts.numel()), key=lambda i: (-int(counts[i]), i))
    kept = torch.tensor(sorted(order[:draft_vocab_size]), dtype=torch.int64)
    return kept - torch.arange(draft_vocab_size, dtype=torch.int64)


def set_d2t(model, d2t: torch.Tensor) -> None:
    module = getattr(_unwrap(model), "eagle_module", None)
    if module is None or not hasattr(module, "d2t"):
        raise UsageError("this draft head has no draft vocabulary (d2t): --draft-vocab-size is for EAGLE")
    if module.d2t.shape != d2t.shape:
        raise UsageError(f"d2t of {d2t.numel()} ids for a draft vocabulary of {module.d2t.numel()}")
    module.d2t.copy_(d2t.to(module.d2t.device))


def d2t_coverage(counts: torch.Tensor, d2t: torch.Tensor) -> float:
    """Share of the counted tokens that the draft vocabulary holds."""
    kept = torch.arange(d2t.numel()) + d2t.cpu()
    return float(counts[kept].sum() / counts.sum().clamp(min=1))


# ----------------------------------------------------------------------------- training glue


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / Float16Module
        model = model.module
    return model


def prepare_for_training(model) -> None:
    """Per-term loss records and the fp32 in-place fix (module docstring). Call after
    :func:`convert_model` or a ``--load`` that restored the head, before the DDP wrap."""
    model = _unwrap(model)
    kind = draft_kind(model)
    if kind is None:
        raise UsageError("the model has no draft head")
    setattr(model, TERMS_ATTR, [])
    model.register_forward_pre_hook(lambda m, args: getattr(m, TERMS_ATTR).clear())
    lm_loss = type(model).compute_language_model_loss

    if kind == "eagle":
        model.eagle_report_acc = False

        def safe_lm_loss(self, labels, logits):
            return lm_loss(self, labels, logits.clone() if logits.dtype == torch.float32 else logits)

        eagle_loss = type(model)._compute_eagle_loss

        def recorded_eagle_loss(self, logits, labels, eagle_logits):
            out = eagle_loss(self, logits, labels, eagle_logits)  # [b, s-1]: position j -> j + 1
            terms = getattr(self, TERMS_ATTR)
            step = len(terms) // 2  # the plugin computes one loss per TTT step, in order
            full = torch.zeros(out.shape[0], out.shape[1] + 1, dtype=out.dtype, device=out.device)
            full[:, step + 1:] = out[:, step:].detach()  # where the plugin adds it to the loss
            terms.append((f"eagle ttt-{step} loss", full, step + 1))
            terms.append((f"eagle ttt-{step} acc", _top1_match(self, logits, eagle_logits), step + 1))
            return out

        model.compute_language_model_loss = MethodType(safe_lm_loss, model)
        model._compute_eagle_loss = MethodType(recorded_eagle_loss, model)
    else:
        model.medusa_report_acc = False  # it prints the accuracy on every training forward

        def recorded_lm_loss(self, labels, logits):
            out = lm_loss(self, labels, logits)
            terms = getattr(self, TERMS_ATTR)
            head = len(terms) - 1  # the first call is the target's own loss, then head 0, 1, ...
            if head < 0:
                terms.append(None)
                return out
            # head i predicts token t + 2 + i from position t: the plugin adds it at [:, i + 1:]
            full = torch.zeros(out.shape[0], out.shape[1] + head + 1, dtype=out.dtype, device=out.device)
            full[:, head + 1:] = out.detach()
            terms.append((f"medusa head-{head} loss", full, head + 1))
            return out

        model.compute_language_model_loss = MethodType(recorded_lm_loss, model)


def _top1_match(model, logits: torch.Tensor, eagle_logits: torch.Tensor) -> torch.Tensor:
    """[b, s]: 1 where the draft's top token (mapped through d2t) at row t - 1 is the target's
    top token at row t (ModelOpt's ``eagle_report_acc`` measure, per position)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        target = gather_from_tensor_model_parallel_region(logits).argmax(-1)  # [s, b]
        draft = gather_from_tensor_model_parallel_region(eagle_logits).argmax(-1)
        d2t = getattr(model.eagle_module, "d2t", None)
        if d2t is not None:
            draft = draft + d2t[draft]
        match = torch.zeros_like(target, dtype=torch.float32)
        match[1:] = (draft[:-1] == target[1:]).float()
    return match.transpose(0, 1)


def recorded_terms(model) -> list[tuple[str, torch.Tensor, int]]:
    """The per-term losses of the last forward (:func:`prepare_for_training`)."""
    return [t for t in getattr(_unwrap(model), TERMS_ATTR, []) if t is not None]


def parameter_report(model) -> tuple[int, int, str]:
    """(trainable, frozen, text): only draft parameters may train."""
    model = _unwrap(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stray = [n for n in trainable if not n.startswith(("eagle_module.", "medusa_heads."))]
    if stray:
        raise UsageError(f"target parameters would train: {', '.join(stray[:4])}")
    n = sum(trainable.values())
    return n, frozen, (f"draft head: {n:,} trainable parameters on this rank; target: {frozen:,} "
                       f"frozen (no gradient buffer, no optimizer state)")


def check_loaded_head(kind: str, cfg: DraftTrainConfig) -> None:
    want = "medusa" if cfg.algorithm == "medusa" else "eagle"
    if kind != want:
        raise UsageError(f"--load holds a {kind} head but --algorithm is {cfg.algorithm}")
    print_rank_0(f"--load holds a trained {kind} head: training continues on it "
                 f"(--algorithm / head flags of the checkpoint apply)")
