"""Knowledge distillation on megatron-core through ModelOpt (Megatron-LM's ``--export-kd-*``).

:func:`setup_distillation` builds the teacher at the student's TP/PP, loads it, freezes it and
wraps student + teacher in ModelOpt's ``DistillationModel`` (``mtd.convert`` with mode
``kd_loss`` and the megatron plugin's criterion, balancer and adjustments). Call it before
``training.build_optimizer``: the teacher's parameters never require grad, so megatron-core's
DDP gives them no gradient buffer and the optimizer no state. The plugin hides the teacher from
``sharded_state_dict`` and ModelOpt does not record the ``kd_loss`` mode in the ModelOpt state,
so a saved checkpoint holds the student only; a resume loads the student and attaches the teacher
again from the same flags. The loss terms are :func:`post_training.loss_func.loss_func`'s.

The KD yaml (``--export-kd-cfg``) is Megatron-LM's schema, checked here key by key:
``logit_layers``, ``intermediate_layer_pairs`` (``[student, teacher]`` or
``[student, teacher, cosine|mse]``), ``skip_lm_loss``, ``kd_loss_scale``,
``logit_kl_temperature``, ``logit_kl_topk``.

Only yaml / pathlib at module level: :func:`read_kd_cfg` and :func:`check_distill_inputs` run in
``--preflight`` before megatron-core is imported.
"""
from __future__ import annotations

import copy
import re
from types import MethodType
from pathlib import Path
from typing import Any, Callable

import yaml

from post_training.config import DistillConfig, ModelConfig, SourceConfig
from post_training.utils import UsageError, print_rank_0

KD_DEFAULTS: dict[str, Any] = {
    "logit_layers": ["output_layer", "output_layer"],
    "intermediate_layer_pairs": [],
    "skip_lm_loss": True,
    "kd_loss_scale": 1.0,
    "logit_kl_temperature": 1.0,
    "logit_kl_topk": None,
}
INTERMEDIATE_LOSSES = ("cosine", "mse")
# Megatron-LM argument names a teacher model_config.yaml may override -> HF config fields
# (the toolkit builds every model from an HF config).
TEACHER_OVERRIDES = {
    "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "kv_channels": "head_dim",
    "padded_vocab_size": "vocab_size", "vocab_size": "vocab_size", "norm_epsilon": "rms_norm_eps",
    "rotary_base": "rope_theta", "max_position_embeddings": "max_position_embeddings",
}
_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # "decoder.layers.3.mlp" -> 3 (ModelOpt's rule)


# ----------------------------------------------------------------------------- inputs (cheap)


def read_kd_cfg(path: str | None) -> dict[str, Any]:
    """The KD recipe with defaults filled in; one UsageError naming a bad key or value."""
    cfg = copy.deepcopy(KD_DEFAULTS)
    if path is None:
        return cfg
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"--export-kd-cfg {path} is not yaml: {str(e).splitlines()[0]}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UsageError(f"--export-kd-cfg {path} must be a mapping of {', '.join(KD_DEFAULTS)}")
    unknown = sorted(set(data) - set(KD_DEFAULTS))
    if unknown:
        raise UsageError(f"--export-kd-cfg {path}: unknown key {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(KD_DEFAULTS)})")
    cfg.update(data)

    def bad(key: str, want: str) -> UsageError:
        return UsageError(f"--export-kd-cfg {path}: {key} must be {want} (got {cfg[key]!r})")

    layers = cfg["logit_layers"]
    if not (isinstance(layers, (list, tuple)) and len(layers) == 2 and all(isinstance(x, str) for x in layers)):
        raise bad("logit_layers", "[student_layer, teacher_layer]")
    pairs = cfg["intermediate_layer_pairs"] or []
    if not isinstance(pairs, (list, tuple)):
        raise bad("intermediate_layer_pairs", "a list of [student, teacher(, cosine|mse)]")
    for entry in pairs:
        ok = (isinstance(entry, (list, tuple)) and len(entry) in (2, 3) and all(isinstance(x, str) for x in entry)
              and (len(entry) == 2 or entry[2] in INTERMEDIATE_LOSSES))
        if not ok:
            raise UsageError(f"--export-kd-cfg {path}: intermediate_layer_pairs entry {entry!r} must be "
                             f"[student_layer, teacher_layer] or [student_layer, teacher_layer, cosine|mse]")
    cfg["intermediate_layer_pairs"] = [list(e) for e in pairs]
    if not isinstance(cfg["skip_lm_loss"], bool):
        raise bad("skip_lm_loss", "true or false")
    for key in ("kd_loss_scale", "logit_kl_temperature"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or cfg[key] <= 0:
            raise bad(key, "a positive number")
        cfg[key] = float(cfg[key])
    topk = cfg["logit_kl_topk"]
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise bad("logit_kl_topk", "a positive integer or null")
    return cfg


def teacher_kind(dcfg: DistillConfig) -> str:
    """'hf' (an HF directory, imported) or 'dist' (a dist checkpoint), checked against
    --export-kd-teacher-ckpt-format."""
    from post_training.io import layout as cio

    path = Path(dcfg.teacher_load)
    if not path.exists():
        raise UsageError(f"teacher checkpoint not found: {path}")
    if (path / "config.json").is_file() and not cio.is_checkpoint_root(path):
        kind = "hf"
    else:
        try:
            cio.find_checkpoint(path)
        except UsageError as e:
            raise UsageError(f"--export-kd-teacher-load {path} is neither an HF directory nor a dist "
                             f"checkpoint ({e})") from None
        kind = "dist"
    want = {"torch_dist": "dist", "hf": "hf"}.get(dcfg.teacher_ckpt_format, kind)
    if want != kind:
        raise UsageError(f"--export-kd-teacher-ckpt-format {dcfg.teacher_ckpt_format}: {path} is "
                         f"{'an HF directory' if kind == 'hf' else 'a dist checkpoint'}")
    return kind


def _teacher_config_file(dcfg: DistillConfig) -> Path | None:
    if dcfg.teacher_model_config:
        p = Path(dcfg.teacher_model_config)
        if not p.is_file():
            raise UsageError(f"--export-kd-teacher-model-config file not found: {p}")
        return p
    default = Path(dcfg.teacher_load) / "model_config.yaml"  # Megatron-LM's default place
    return default if default.is_file() else None


def check_distill_inputs(dcfg: DistillConfig) -> None:
    """Everything about the distillation flags that needs no model: for --preflight."""
    if not dcfg.enabled:
        return
    teacher_kind(dcfg)
    read_kd_cfg(dcfg.kd_cfg)
    f = _teacher_config_file(dcfg)
    if f is not None:
        _teacher_overrides(f)


def _teacher_overrides(path: Path) -> tuple[dict, str | None]:
    """(HF-config overrides, the HF model conf name when the file is a model conf)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise UsageError(f"teacher model config {path} must be a mapping")
    if "hf_model_id" in data:  # a model conf (examples/conf): the teacher is that model
        return {}, str(path)
    out = {}
    for key, value in data.items():
        if key not in TEACHER_OVERRIDES:
            raise UsageError(f"teacher model config {path}: unknown key {key!r} "
                             f"(known: {', '.join(TEACHER_OVERRIDES)})")
        out[TEACHER_OVERRIDES[key]] = value
    return out, None


# ----------------------------------------------------------------------------- the teacher


def teacher_hf_config(dcfg: DistillConfig, student_hf: Any) -> tuple[Any, Path | None]:
    """The teacher's HF config and the HF directory it came from (None: the student's
    architecture, Megatron-LM's QAD case). Base: the teacher's own config.json, or the HF config
    its dist checkpoint recorded, or the student's; then the model_config.yaml overrides."""
    from transformers import AutoConfig

    from post_training import hf as hf_mod
    from post_training.io import layout as cio

    kind = teacher_kind(dcfg)
    path = Path(dcfg.teacher_load)
    base_dir: Path | None = path if kind == "hf" else cio.find_checkpoint(path).parent / cio.HF_CONFIG_DIR
    overrides, conf = {}, None
    f = _teacher_config_file(dcfg)
    if f is not None:
        overrides, conf = _teacher_overrides(f)
    if conf is not None:
        base_dir = hf_mod.conf_hf_dir(hf_mod.load_conf(conf), path if kind == "hf" else None)
    if base_dir is not None and (base_dir / "config.json").is_file():
        hf = AutoConfig.from_pretrained(base_dir)
    else:
        base_dir, hf = None, copy.deepcopy(student_hf)
        print_rank_0("distillation: no teacher config found; the teacher has the student's architecture")
    for k, v in overrides.items():
        setattr(hf, k, v)
    return hf, base_dir


def build_teacher(dcfg: DistillConfig, src: SourceConfig, mcfg: ModelConfig, rt, student_hf: Any,
                  check: Callable[[Any], None] | None = None):
    """The teacher stage of this rank at the student's TP/PP, loaded, in eval, frozen.
    ``check(teacher_hf_config)`` runs before anything is built or read."""
    from post_training.checkpointing.load import load_model_checkpoint
    from post_training.model_builder import build_model, import_hf_weights

    hf, base_dir = teacher_hf_config(dcfg, student_hf)
    if check is not None:
        check(hf)
    teacher = build_model(hf, rt, mcfg)
    if teacher_kind(dcfg) == "dist":
        load_model_checkpoint(dcfg.teacher_load, teacher, rt, strictness="raise_all",
                              verify_hashes=src.verify_hashes)
    else:
        try:
            import_hf_weights(teacher, dcfg.teacher_load, mcfg.torch_dtype)
        except Exception as e:  # shape overrides that do not fit the weights, unreadable files
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise UsageError(f"could not load the teacher from {dcfg.teacher_load}: "
                             f"{type(e).__name__}: {first}") from None
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, hf, base_dir


# ----------------------------------------------------------------------------- checks


def _local_layer_name(name: str, cfg, rt) -> str | None:
    """``name`` with its global layer index made local to the last pipeline stage; raises when
    the layer lives on another stage (the KD losses run on the last stage only)."""
    m = _LAYER_INDEX.search(name)
    if not m:
        return name
    per_stage = cfg.num_layers // rt.pp
    first_last = cfg.num_layers - per_stage
    idx = int(m.group(0))
    if idx >= cfg.num_layers:
        raise UsageError(f"intermediate layer {name!r}: the model has {cfg.num_layers} layers")
    if idx < first_last:
        raise UsageError(f"intermediate layer {name!r} is on pipeline stage {idx // per_stage} of {rt.pp}: "
                         f"distillation losses run on the last stage (layers {first_last}.."
                         f"{cfg.num_layers - 1}); pick those layers or a smaller PP")
    return name[:m.start()] + str(idx - first_last) + name[m.end():]


def _check_models(student, teacher, kd: dict, dcfg: DistillConfig, rt, tokenizer, teacher_dir) -> None:
    """Fit of teacher and student, raised alike on every rank (only the last stage holds the
    layers, so each rank's finding is shared before anyone raises)."""
    from post_training.runtime.collectives import gather_objects

    err = None
    try:
        _check_fit(student, teacher, kd, dcfg, rt, tokenizer, teacher_dir)
    except UsageError as e:
        err = str(e)
    errors = [e for e in gather_objects(err) if e]
    if errors:
        raise UsageError(errors[0])


def check_teacher_config(student, thf: Any, kd: dict, dcfg: DistillConfig, rt) -> None:
    """What the teacher's HF config alone decides (the same on every rank): vocabulary,
    hidden size for intermediate pairs, pipeline stage of the paired layers."""
    from types import SimpleNamespace

    sv, tv = student.vocab_size, thf.vocab_size
    if sv != tv:
        if not dcfg.truncate_vocab:
            raise UsageError(
                f"teacher vocabulary ({tv}) differs from the student's ({sv}): KD compares token "
                f"distributions, so both need one tokenizer; when one vocabulary is the other padded "
                f"(e.g. 152064 vs 151936), --kd-truncate-vocab compares the first {min(sv, tv)} tokens")
        if rt.tp > 1:
            raise UsageError("--kd-truncate-vocab works at TP=1 only (the vocab-parallel shards of "
                             "the two models do not line up)")
    pairs = kd["intermediate_layer_pairs"]
    if pairs and student.config.hidden_size != thf.hidden_size:
        raise UsageError(
            f"intermediate_layer_pairs need equal hidden sizes (student {student.config.hidden_size}, "
            f"teacher {thf.hidden_size}): the projection ModelOpt would insert is neither saved nor "
            f"trained here; use logits-only KD")
    tcfg = SimpleNamespace(num_layers=thf.num_hidden_layers)
    for entry in pairs:
        _local_layer_name(entry[0], student.config, rt)
        _local_layer_name(entry[1], tcfg, rt)


def _check_fit(student, teacher, kd, dcfg, rt, tokenizer, teacher_dir) -> None:
    if teacher_dir is not None and tokenizer is not None and (Path(teacher_dir) / "tokenizer.json").is_file():
        from post_training.hf import load_tokenizer

        if load_tokenizer(Path(teacher_dir)).get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"the teacher's tokenizer ({teacher_dir}) differs from the student's: "
                             f"KD needs one tokenizer")
    for entry in kd["intermediate_layer_pairs"]:
        for model, name, who in ((student, entry[0], "student"), (teacher, entry[1], "teacher")):
            local = _local_layer_name(name, model.config, rt)
            if rt.is_last_stage:
                try:
                    model.get_submodule(local)
                except AttributeError:
                    raise UsageError(f"intermediate layer {name!r} is not a module of the {who} "
                                     f"(e.g. decoder.layers.0.input_layernorm, decoder.final_layernorm)") from None
    if rt.is_last_stage:
        for model, who in ((student, "student"), (teacher, "teacher")):
            for layer in kd["logit_layers"][:1] if who == "student" else kd["logit_layers"][1:]:
                try:
                    model.get_submodule(layer)
                except AttributeError:
                    raise UsageError(f"logit layer {layer!r} is not a module of the {who}") from None
    # A teacher that silently stayed at zeros (Megatron-LM users hit it) would teach nothing.
    zero = [n for n, p in teacher.named_parameters() if p.dim() == 2 and not bool(p.any())]
    if zero:
        raise UsageError(f"teacher weights were not loaded: {', '.join(zero[:4])} are all zero")


# ----------------------------------------------------------------------------- attach


def _truncated_logits_loss(base_cls, vocab: int):
    """ModelOpt's logits KL over the first ``vocab`` entries (padded vocabularies)."""

    class TruncatedLogitsKLLoss(base_cls):
        def pre_forward(self, predictions, targets):
            predictions, targets = super().pre_forward(predictions, targets)
            return predictions[..., :vocab], targets[..., :vocab]

    return TruncatedLogitsKLLoss


def _student_lm_loss(model, skip_lm_loss: bool) -> None:
    """Replace the plugin's student LM loss (an instance method it sets, so no upstream code
    changes) for two reasons:

    * megatron-core's vocab-parallel cross entropy works in place on fp32 logits (its
      ``.float()`` is then no copy): the logits the KD hook captured on ``output_layer`` turn
      into softmax probabilities before the KL reads them. bf16 logits are copied by that
      ``.float()``; fp32 ones (CPU runs) are cloned here.
    * under ``skip_lm_loss`` the plugin returns zeros (Megatron-LM logs ``lm loss 0``); the real
      per-token loss is returned detached instead, so the LM loss is reported while no gradient
      flows from it (the balancer leaves it out of the total)."""
    import torch

    def _lm_loss(self, labels, logits):
        safe = logits.clone() if logits.dtype == torch.float32 else logits
        loss = type(self).compute_language_model_loss(self, labels, safe)
        return loss.detach() if skip_lm_loss and self.training else loss

    model.compute_language_model_loss = MethodType(_lm_loss, model)


def setup_distillation(student, dcfg: DistillConfig, src: SourceConfig, mcfg: ModelConfig, rt,
                       tokenizer) -> tuple[Any, Callable | None]:
    """Attach the teacher to ``student`` (this rank's GPTModel stage, trainable, not yet DDP
    wrapped). Returns (ModelOpt ``DistillationModel``, the PP send/recv shape hook for
    ``train_step`` or None). Without ``dcfg.teacher_load`` returns ``(student, None)``."""
    if not dcfg.enabled:
        return student, None
    import modelopt.torch.distill as mtd
    import modelopt.torch.distill.plugins.megatron as mtd_mcore
    from transformers import AutoConfig

    from post_training import hf as hf_mod

    if type(student).__name__ == "DistillationModel" or hasattr(student, "teacher_model"):
        raise UsageError("the model already has a teacher attached")
    kd = read_kd_cfg(dcfg.kd_cfg)
    student_hf = AutoConfig.from_pretrained(hf_mod.source_hf_dir(src))
    teacher, _, teacher_dir = build_teacher(
        dcfg, src, mcfg, rt, student_hf, check=lambda thf: check_teacher_config(student, thf, kd, dcfg, rt))
    _check_models(student, teacher, kd, dcfg, rt, tokenizer, teacher_dir)

    dc = mtd_mcore.DistillationConfig(
        intermediate_layer_pairs=[tuple(e) for e in kd["intermediate_layer_pairs"]],
        logit_layers=tuple(kd["logit_layers"]), skip_lm_loss=kd["skip_lm_loss"],
        kd_loss_scale=kd["kd_loss_scale"], logit_kl_temperature=kd["logit_kl_temperature"],
        logit_kl_topk=kd["logit_kl_topk"])
    dc = mtd_mcore.setup_distillation_config(dc, student.config, teacher.config)
    if student.vocab_size != teacher.vocab_size and rt.is_last_stage:
        key = tuple(kd["logit_layers"])
        old = dc.criterion[key]
        cls = _truncated_logits_loss(type(old), min(student.vocab_size, teacher.vocab_size))
        extra = {"top_k": old.top_k} if hasattr(old, "top_k") else {}
        dc.criterion[key] = cls(student.config, temperature=kd["logit_kl_temperature"], **extra)
    model = mtd.convert(student, mode=[("kd_loss", {"teacher_model": teacher, "criterion": dc.criterion,
                                                     "loss_balancer": dc.loss_balancer})])
    mtd_mcore.adjust_distillation_model_for_mcore(model, dc)
    _student_lm_loss(model, dc.skip_lm_loss)
    adjust = mtd_mcore.get_tensor_shapes_adjust_fn_for_distillation(
        model, seq_length=mcfg.seq_length, micro_batch_size=1, decoder_seq_length=None)
    print_rank_0(f"distillation: teacher {dcfg.teacher_load} ({teacher_summary(model)}); "
                 f"KD: logits KL{' + ' + str(len(kd['intermediate_layer_pairs'])) + ' intermediate' if kd['intermediate_layer_pairs'] else ''}"
                 f", {'no LM loss' if kd['skip_lm_loss'] else 'with LM loss'}")
    return model, adjust


def teacher_summary(model) -> str:
    """Teacher size and what freezing it saves on this rank (no fp32 grad buffer, no Adam
    moments, no fp32 main copy for half-precision params)."""
    teacher = getattr(model, "teacher_model", None)
    if teacher is None:
        return "no teacher"
    n = sum(p.numel() for p in teacher.parameters())
    wbytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    half = any(p.element_size() < 4 for p in teacher.parameters())
    saved = n * (4 + 8 + (4 if half else 0))
    return (f"{n / 1e6:.2f}M params on this rank, {wbytes / 2**20:.1f} MiB, frozen: no grads or "
            f"optimizer state, {saved / 2**20:.1f} MiB not allocated")
