"""Loading and saving models.

This first part resolves where a model comes from (model conf, HF directory, the embedded
GGUF model) and imports HF weights into the megatron-core model. Sharded megatron-core
dist checkpoints (``--load``/``--save``) are added on top of this by the checkpointing work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch.distributed as dist

from post_training import hf
from post_training.model_builder import ModelConfig, build_model, check_parallel, import_hf_weights
from post_training.runtime import ParallelConfig, Runtime
from post_training.utils import UsageError


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

    def validate(self, par: ParallelConfig) -> hf.ModelConf:
        """Cheap checks that need no process group (run before torchrun starts ranks)."""
        conf = hf.load_conf(self.model_conf)
        shape = dict(conf.expect)
        if self.pretrained_model_path:
            cfg = hf.check_hf_dir(self.pretrained_model_path) / "config.json"
            shape = json.loads(cfg.read_text())
        if self.load:
            self.load_kind()
        if {"num_attention_heads", "num_hidden_layers"} <= shape.keys():
            check_parallel(SimpleNamespace(**shape), par.tp, par.pp)
        return conf

    def load_kind(self) -> str:
        """'hf' when --load is an HF directory (falls back to HF import)."""
        p = Path(self.load)
        if not p.exists():
            raise UsageError(f"--load path not found: {p}")
        if (p / "config.json").is_file():
            return "hf"
        raise UsageError(f"--load {p}: not an HF directory; megatron dist checkpoints are not supported yet")


def resolve_hf_dir(src: SourceConfig) -> Path:
    """The HF directory for this run; rank 0 materializes the embedded model, others wait."""
    conf = hf.load_conf(src.model_conf)
    path = src.pretrained_model_path
    if src.load and src.load_kind() == "hf":
        path = src.load
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
    """Build this rank's model stage and fill it. Returns (model, tokenizer, hf_config).

    ``inference`` freezes the weights: megatron's linear layers then take their frozen-weight
    path, which skips gradient bookkeeping (about 6% of a CPU decode step on SmolLM2)."""
    from transformers import AutoConfig

    hf_dir = resolve_hf_dir(src)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    # The default conf with another HF dir means "use that model"; a named conf must match it.
    if not (src.pretrained_model_path and src.model_conf == hf.EMBEDDED_MODEL):
        hf.check_expected(hf.load_conf(src.model_conf), hf_config)
    model = build_model(hf_config, rt, mcfg)
    import_hf_weights(model, hf_dir, mcfg.torch_dtype)
    model.eval()
    if inference:
        model.requires_grad_(False)
    return model, load_tokenizer(hf_dir), hf_config
