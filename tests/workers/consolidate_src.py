"""Worker: make the checkpoints that ``consolidate`` is tested on, from tiny HF models.

  consolidate_src.py --model NAME=HF_DIR [...] --out BASE [--pp-model NAME] [--quantize-model NAME]

Run on 2 ranks. For each model, at TP=2: ``BASE/NAME/dist`` (toolkit dist checkpoint),
``BASE/NAME/legacy`` (Megatron-LM legacy layout: ``iter_0000010/mp_rank_XX/model_optim_rng.pt``
holding this rank's ``model.state_dict()`` and an ``args`` Namespace) and ``BASE/NAME/logits.pt``
(the toolkit's logits on ``IDS``). ``--pp-model`` also saves that model at TP=1 PP=2
(``dist_pp2``, ``legacy_pp2``); ``--quantize-model`` saves an FP8-quantized copy (``fp8``).
One process group for everything: starting torchrun once per checkpoint would cost more
than the saves.
"""
import argparse
from argparse import Namespace
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from post_training.checkpointing import save_checkpoint
from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.inference import stage_forward
from post_training.config import ModelConfig
import post_training.runtime.dist as rtdist
from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime

IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000


def megatron_args(model, hf_config, rt) -> Namespace:
    """The subset of Megatron-LM's saved ``args`` that describes the model."""
    c = model.config
    return Namespace(
        num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads, group_query_attention=True,
        num_query_groups=c.num_query_groups, kv_channels=c.kv_channels, norm_epsilon=c.layernorm_epsilon,
        normalization="RMSNorm", swiglu=True, add_bias_linear=False, add_qkv_bias=c.add_qkv_bias,
        qk_layernorm=c.qk_layernorm, position_embedding_type="rope", rotary_base=model.rotary_base,
        untie_embeddings_and_output_weights=not model.share_embeddings_and_output_weights,
        max_position_embeddings=hf_config.max_position_embeddings, padded_vocab_size=model.vocab_size,
        tensor_model_parallel_size=rt.tp, pipeline_model_parallel_size=rt.pp, params_dtype=c.params_dtype,
    )


def save_legacy(model, hf_config, rt, root: Path) -> None:
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp_rank:02d}" if rt.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    d = root / "iter_0000010" / name
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    torch.save({"model": sd, "args": megatron_args(model, hf_config, rt), "checkpoint_version": 3.0,
                "iteration": 10}, d / "model_optim_rng.pt")
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text("10")


def save_all(hf_dir: str, base: Path, rt, suffix: str = "", quantize: bool = False) -> None:
    model, _, hf_config = setup_model(SourceConfig(pretrained_model_path=hf_dir), ModelConfig(), rt)
    save_checkpoint(model, rt, base / f"dist{suffix}", 10, hf_dir=Path(hf_dir))
    save_legacy(model, hf_config, rt, base / f"legacy{suffix}")
    if not suffix:
        with torch.inference_mode():
            logits = stage_forward(model, IDS, None)
        if ps.get_tensor_model_parallel_rank() == 0 and rt.is_last_stage:
            torch.save({"logits": logits}, base / "logits.pt")
    if quantize:
        import modelopt.torch.quantization as mtq

        model = mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: stage_forward(m, IDS, None))
        save_checkpoint(model, rt, base / "fp8", 10, hf_dir=Path(hf_dir))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True, help="NAME=HF_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--pp-model")
    p.add_argument("--quantize-model")
    a = p.parse_args()
    models = dict(m.split("=", 1) for m in a.model)
    rt = init_runtime(ParallelConfig(tp=2, device="cpu"))
    for name, hf_dir in models.items():
        save_all(hf_dir, Path(a.out) / name, rt, quantize=name == a.quantize_model)
    if a.pp_model:
        # Same process group, new model-parallel layout.
        ps.destroy_model_parallel()
        rtdist._RUNTIME = None
        rt = init_runtime(ParallelConfig(pp=2, device="cpu"))
        save_all(models[a.pp_model], Path(a.out) / a.pp_model, rt, suffix="_pp2")
    destroy_runtime()


if __name__ == "__main__":
    main()
