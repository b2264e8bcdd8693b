"""Quantization formats: ModelOpt's configs by name, yaml/json recipes, the KV-cache formats."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from post_training.config import AUTO, QuantizeConfig
from post_training.utils import UsageError

KV_CACHE_CFGS = {"none": None, "fp8": "FP8_KV_CFG", "fp8_affine": "FP8_AFFINE_KV_CFG",
                 "nvfp4": "NVFP4_KV_CFG", "nvfp4_affine": "NVFP4_AFFINE_KV_CFG",
                 "nvfp4_rotate": "NVFP4_KV_ROTATE_CFG"}


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


def auto_formats(qcfg: QuantizeConfig) -> list[str]:
    names = [n.strip() for n in qcfg.auto_formats.split(",") if n.strip()]
    valid = available_formats()
    bad = [n for n in names if n not in valid]
    if not names or bad:
        raise UsageError(f"--auto-quantize-formats: unknown {', '.join(bad) or '(empty)'}; valid: {', '.join(valid)}")
    return names
