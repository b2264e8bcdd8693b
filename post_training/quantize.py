"""Post-training quantization with ModelOpt on the megatron-core model.

Formats are ModelOpt's own configs, by name (``FP8_DEFAULT_CFG``, ``INT8_SMOOTHQUANT_CFG``,
``NVFP4_DEFAULT_CFG``, ...) or a yaml/json recipe with a ``quant_cfg`` list; the KV cache is
quantized on top with ``--export-kv-cache-quant``. Calibration text comes through ``datasets``
(a hub name when online, local jsonl/json/parquet/text files) or, by default, the built-in
offline text; chat datasets are rendered with the model's chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from post_training.data import builtin_text, token_chunks
from post_training.utils import UsageError

KV_CACHE_CFGS = {"none": None, "fp8": "FP8_KV_CFG", "fp8_affine": "FP8_AFFINE_KV_CFG",
                 "nvfp4": "NVFP4_KV_CFG", "nvfp4_affine": "NVFP4_AFFINE_KV_CFG",
                 "nvfp4_rotate": "NVFP4_KV_ROTATE_CFG"}
BUILTIN = "builtin"
AUTO = "auto"  # --export-quant-cfg auto: per-layer format search (mtq.auto_quantize)
AUTO_METHODS = ("gradient", "kl_div")


@dataclass(kw_only=True)
class QuantizeConfig:
    """Flags: --export-quant-cfg, --export-kv-cache-quant, --calib-dataset, --calib-dataset-split,
    --calib-dataset-field, --calib-size, --calib-seq-length."""

    quant_cfg: str = "FP8_DEFAULT_CFG"  # a ModelOpt config name, or a .yaml/.yml/.json recipe
    kv_cache_quant: str = "none"
    calib_dataset: str = BUILTIN
    calib_split: str = "train"
    calib_field: str | None = None
    calib_size: int = 32  # samples of calib_seq_length tokens
    calib_seq_length: int = 512
    # auto-quantize (--auto-quantize-bits / -formats / -method / -score-size)
    auto_bits: float | None = None  # effective weight bits the searched model must not exceed
    auto_formats: str = "FP8_DEFAULT_CFG,INT4_AWQ_CFG"  # candidates; "no quantization" is implied
    auto_method: str = "gradient"
    auto_score_size: int = 16  # samples used to score layer sensitivity (calibration uses all)

    def __post_init__(self) -> None:
        if self.quant_cfg == AUTO:
            if self.auto_bits is None:
                raise UsageError("--export-quant-cfg auto needs --auto-quantize-bits (e.g. 6.0)")
            if not 1.0 <= self.auto_bits <= 16.0:
                raise UsageError(f"--auto-quantize-bits must be in [1, 16] (got {self.auto_bits})")
            if self.auto_method not in AUTO_METHODS:
                raise UsageError(f"--auto-quantize-method must be one of {', '.join(AUTO_METHODS)}")
            if self.auto_score_size < 1:
                raise UsageError("--auto-quantize-score-size must be >= 1")
        elif self.auto_bits is not None:
            raise UsageError("--auto-quantize-bits only applies to --export-quant-cfg auto")
        if self.kv_cache_quant not in KV_CACHE_CFGS:
            raise UsageError(f"--export-kv-cache-quant must be one of {', '.join(KV_CACHE_CFGS)} "
                             f"(got {self.kv_cache_quant!r})")
        if self.calib_size < 1 or self.calib_seq_length < 2:
            raise UsageError("--calib-size must be >= 1 and --calib-seq-length >= 2")


def available_formats() -> list[str]:
    import modelopt.torch.quantization as mtq

    return sorted(n for n in dir(mtq) if n.endswith("_CFG") and isinstance(getattr(mtq, n), dict)
                  and "quant_cfg" in getattr(mtq, n) and not n.endswith("KV_CFG")
                  and "KV_ROTATE" not in n)


def resolve_quant_cfg(spec: str, kv_cache_quant: str = "none") -> dict[str, Any]:
    """A ModelOpt quantization config from a name or a recipe file, with the KV-cache format.
    For ``auto`` this is the KV-cache part alone (applied after the search)."""
    import copy

    import modelopt.torch.quantization as mtq

    if spec == AUTO:
        cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"}
    elif spec.endswith((".yaml", ".yml", ".json")):
        cfg = _read_recipe(Path(spec))
    elif spec in available_formats():
        cfg = copy.deepcopy(getattr(mtq, spec))
    else:
        raise UsageError(f"unknown quantization config {spec!r}; valid: {', '.join(available_formats())} "
                         f"(or a .yaml/.json recipe file)")
    kv = KV_CACHE_CFGS[kv_cache_quant]
    if kv is not None and spec == AUTO:
        cfg = {"quant_cfg": list(getattr(mtq, kv)["quant_cfg"]), "algorithm": "max"}
    elif kv is not None:
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, getattr(mtq, kv)["quant_cfg"])
    return cfg


def _read_recipe(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise UsageError(f"quantization recipe not found: {path}")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"quantization recipe {path} does not parse: {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("quant_cfg", []), list) or \
            not ("quant_cfg" in data or "base" in data):
        raise UsageError(f"quantization recipe {path} needs a 'quant_cfg' list (and optionally 'base', 'algorithm')")
    if "base" in data:  # a named config with entries appended: later entries win in ModelOpt
        import copy

        import modelopt.torch.quantization as mtq

        if data["base"] not in available_formats():
            raise UsageError(f"quantization recipe {path}: unknown base {data['base']!r}; "
                             f"valid: {', '.join(available_formats())}")
        base = copy.deepcopy(getattr(mtq, data["base"]))
        base["quant_cfg"] = list(base["quant_cfg"]) + list(data.get("quant_cfg", []))
        if "algorithm" in data:
            base["algorithm"] = data["algorithm"]
        return base
    return data


# ----------------------------------------------------------------------------- calibration data


def _load_dataset(spec: str, split: str):
    import datasets

    p = Path(spec)
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
    try:
        if p.suffix in kinds or p.exists():
            if not p.is_file():
                raise UsageError(f"calibration file not found: {p}")
            if p.stat().st_size == 0:
                raise UsageError(f"calibration file {p} is empty")
            return datasets.load_dataset(kinds.get(p.suffix, "text"), data_files=str(p), split="train")
        return datasets.load_dataset(spec, split=split)
    except UsageError:
        raise
    except Exception as e:  # offline hub, bad split, unreadable file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"could not load calibration dataset {spec!r}: {type(e).__name__}: {first}") from None


def _sample_text(row: dict, field: str | None, tokenizer) -> str:
    if field is None:
        field = "messages" if "messages" in row else "conversations" if "conversations" in row else "text"
    if field not in row:
        raise UsageError(f"calibration dataset has no field {field!r} (fields: {', '.join(row)}); "
                         f"pass --calib-dataset-field")
    value = row[field]
    if isinstance(value, list):  # chat messages
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("chat-format calibration data needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(value, tokenize=False)
    return str(value)


def calibration_samples(qcfg: QuantizeConfig, tokenizer) -> list[list[int]]:
    """``calib_size`` windows of ``calib_seq_length`` tokens from the calibration source."""
    if qcfg.calib_dataset == BUILTIN:
        text = builtin_text("calib")
    else:
        ds = _load_dataset(qcfg.calib_dataset, qcfg.calib_split)
        if len(ds) == 0:
            raise UsageError(f"calibration dataset {qcfg.calib_dataset} has no rows")
        need = qcfg.calib_size * qcfg.calib_seq_length
        parts, chars = [], 0
        for row in ds:  # stop reading once there is clearly enough text (~2 chars per token)
            parts.append(_sample_text(row, qcfg.calib_field, tokenizer))
            chars += len(parts[-1])
            if chars > 8 * need:
                break
        text = "\n\n".join(parts)
    chunks = token_chunks(text, tokenizer, qcfg.calib_seq_length, qcfg.calib_size)
    if len(chunks) < qcfg.calib_size:
        have = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        raise UsageError(
            f"calibration data {qcfg.calib_dataset!r} has {have} tokens: {len(chunks)} samples of "
            f"{qcfg.calib_seq_length}, fewer than --calib-size {qcfg.calib_size}"
        )
    return chunks


def forward_loop(samples: list[list[int]], forward: Callable[[Any, torch.Tensor], Any],
                 progress: bool = True) -> Callable[[Any], None]:
    """The calibration loop ModelOpt calls: every sample once through the model."""
    from tqdm import tqdm

    def loop(model) -> None:
        device = next(model.parameters()).device
        with torch.no_grad():
            for ids in tqdm(samples, desc="calibrating", disable=not progress):
                forward(model, torch.tensor([ids], device=device))

    return loop


def quantize(model, cfg: dict[str, Any], loop: Callable[[Any], None]):
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, cfg, loop)


def auto_formats(qcfg: QuantizeConfig) -> list[str]:
    names = [n.strip() for n in qcfg.auto_formats.split(",") if n.strip()]
    valid = available_formats()
    bad = [n for n in names if n not in valid]
    if not names or bad:
        raise UsageError(f"--auto-quantize-formats: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(valid)}")
    return names


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next token: the loss whose gradients score layer sensitivity."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def auto_quantize(model, qcfg: QuantizeConfig, samples: list[list[int]],
                  forward: Callable[[Any, torch.Tensor], Any], kv_cfg: dict[str, Any] | None) -> tuple[Any, dict]:
    """Search a format per layer (or none) under an effective-bits budget with ModelOpt's
    ``auto_quantize``, then quantize the KV cache on top when asked. The model must not be frozen:
    the default ``gradient`` method scores layers by backpropagating the loss."""
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device
    batches = [torch.tensor([ids], device=device) for ids in samples]
    model, state = mtq.auto_quantize(
        model, constraints={"effective_bits": qcfg.auto_bits}, quantization_formats=auto_formats(qcfg),
        data_loader=batches, forward_step=forward, loss_func=lambda out, batch: next_token_loss(out, batch),
        num_calib_steps=len(batches), num_score_steps=min(qcfg.auto_score_size, len(batches)),
        method=qcfg.auto_method)
    if kv_cfg is not None:
        mtq.set_quantizer_by_cfg(model, kv_cfg["quant_cfg"])
        _calibrate_only(model, "_bmm_quantizer", forward_loop(samples, forward, progress=False))
    return model, state


def _calibrate_only(model, suffix: str, loop: Callable[[Any], None]) -> None:
    """Max-calibrate the enabled quantizers whose name ends with ``suffix`` while every other
    quantizer keeps quantizing with its searched scales (``mtq.calibrate`` would redo them all)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    chosen = [m for n, m in model.named_modules()
              if isinstance(m, TensorQuantizer) and n.endswith(suffix) and m.is_enabled]
    for q in chosen:
        q.disable_quant()
        q.enable_calib()
    loop(model)
    for q in chosen:
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()


def auto_choices(state: dict) -> dict[str, str]:
    """Layer -> chosen format name, from auto_quantize's search state."""
    out = {}
    for key, recipe in state["best"]["recipe"].items():
        name = str(recipe).split("(")[0]
        out[key.removesuffix(".quant_recipe")] = name
    return out
