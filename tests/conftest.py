"""Shared fixtures: tiny random HF models (unit tests) and the embedded SmolLM2 (integration)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TINY_ARCHS = {
    "llama": dict(arch="LlamaForCausalLM", heads=4, kv=2),
    "qwen3": dict(arch="Qwen3ForCausalLM", heads=4, kv=2),
    "qwen2": dict(arch="Qwen2ForCausalLM", heads=4, kv=2),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "slow: real-model or multi-rank test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, materialized from its GGUF into the toolkit cache."""
    from post_training import hf
    from post_training.config import EMBEDDED_MODEL

    return hf.conf_hf_dir(hf.load_conf(EMBEDDED_MODEL), None)


def make_tiny(out: Path, kind: str, tokenizer_dir: Path, layers: int = 4, seed: int = 0) -> Path:
    """A randomly initialised 4-layer model with the SmolLM2 tokenizer (and chat template)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = TINY_ARCHS[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}
    cfg = AutoConfig.for_model(
        {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2"}[spec["arch"]],
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=spec["heads"], num_key_value_heads=spec["kv"], max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=kind != "qwen2", bos_token_id=1, eos_token_id=2,
        architectures=[spec["arch"]], **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger weights than the default init so logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny(base / k, k, smollm2_dir) for k in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def runtime():
    """One in-process TP=1 runtime shared by the in-process tests."""
    from post_training.runtime import ParallelConfig, init_runtime
    from post_training.utils import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return init_runtime(ParallelConfig(device="cpu"))


# ----------------------------------------------------------------------------- multi-rank launches
# Each torchrun launch costs 10-20 s of process start-up on 2 cores, so the multi-rank checks of
# one layout share one launch (tests/workers/multi.py); the tests read their part of the result.


@pytest.fixture(scope="session")
def mr_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multirank")


KD_YAML = """\
# the distillation recipe of the multi-rank checks: every KD term, the LM loss kept
intermediate_layer_pairs:
  - [decoder.layers.3, decoder.layers.3, cosine]
skip_lm_loss: false
kd_loss_scale: 0.5
logit_kl_temperature: 2.0
"""


@pytest.fixture(scope="session")
def kd_yaml(mr_dir) -> Path:
    path = mr_dir / "kd.yaml"
    path.write_text(KD_YAML)
    return path


def _distill_args(tiny_dirs, kd_yaml) -> tuple[str, ...]:
    """--distill task of tests/workers/multi.py: the tiny llama learns from the tiny qwen2."""
    return ("--distill", str(tiny_dirs["qwen2"]), "--kd-cfg", str(kd_yaml))


def _multi(nproc: int, out: Path, hf_dir: Path, *args: str) -> dict:
    from dist_utils import torchrun

    torchrun(nproc, "multi.py", "--hf-dir", str(hf_dir), "--out", str(out), *args)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="session")
def mr_tp2(tiny_llama, tiny_dirs, mr_dir, kd_yaml) -> dict:
    """TP=2: forward + KV cache, 4 training steps, 6 loop iterations, speculative and batched
    generation, and checkpoints saved at TP=2: plain ("tp2"), FP8 with FP8 KV cache ("fp8"), INT8 per-channel with FP8 KV cache
    ("int8"); 3 distillation steps ("distill"), 3 EAGLE-3 draft-head steps ("eagle"), then
    distillation and the loop again at DP=2 ("distill:dp", "loop:dp")."""
    return _multi(2, mr_dir / "tp2.pt", tiny_llama, "--tp", "2", "--forward", "--kv", "--train", "--loop", "--spec", "--batched", "--eagle",
                  "--save", f"tp2={mr_dir / 'tp2'}", "--save", f"fp8={mr_dir / 'fp8'}:fp8",
                  "--save", f"int8={mr_dir / 'int8'}:int8", *_distill_args(tiny_dirs, kd_yaml),
                  "--distill-dp", "--loop-dp")


@pytest.fixture(scope="session")
def mr_pp2(tiny_llama, tiny_dirs, mr_dir, kd_yaml, mr_tp2) -> dict:
    """PP=2: forward, 4 training steps, 6 loop iterations, a checkpoint saved at PP=2 ("pp2"), the
    TP=2 checkpoint loaded at TP=1 PP=2 ("load:tp2"), 3 distillation steps ("distill"),
    speculative and batched generation, the n-gram acceptance report, and depth pruning 4 -> 2
    saved ("prune")."""
    return _multi(2, mr_dir / "pp2.pt", tiny_llama, "--pp", "2", "--forward", "--train", "--loop", "--spec", "--batched", "--acceptance",
                  "--save", f"pp2={mr_dir / 'pp2'}", "--load", f"tp2={mr_dir / 'tp2'}",
                  "--prune", str(mr_dir / "pruned-pp2"), *_distill_args(tiny_dirs, kd_yaml))


@pytest.fixture(scope="session")
def mr_2x2(tiny_llama, tiny_dirs, mr_dir, kd_yaml, mr_pp2) -> dict:
    """TP=2 x PP=2 (4 ranks): forward, the PP=2 checkpoint loaded at TP=2 PP=2 ("load:pp2"),
    3 distillation steps ("distill")."""
    return _multi(4, mr_dir / "2x2.pt", tiny_llama, "--tp", "2", "--pp", "2", "--forward",
                  "--load", f"pp2={mr_dir / 'pp2'}", *_distill_args(tiny_dirs, kd_yaml))
