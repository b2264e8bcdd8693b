"""``merge-lora CKPT OUT``: ModelOpt LoRA adapters trained by the toolkit at TP=2 (a few steps),
saved in a dist checkpoint, folded into an HF model that transformers runs with the same logits."""
import pytest
import torch

from dist_utils import torchrun
from post_training.checkpointing.tools.cli import main
from post_training.utils import UsageError

IDS = torch.arange(3, 40).unsqueeze(0) * 7 % 4000  # as tests/workers/lora_train.py


@pytest.fixture(scope="module")
def lora_ckpt(tiny_dirs, tmp_path_factory):
    """A TP=2 checkpoint with LoRA on every linear of the 4 layers, trained 3 steps, and the
    toolkit's logits with the adapter active."""
    d = tmp_path_factory.mktemp("lora_dist")
    torchrun(2, "lora_train.py", "train", "--hf-dir", str(tiny_dirs["llama"]), "--save", str(d / "ckpt"),
             "--tp", "2", "--steps", "3", "--out", str(d / "logits.pt"))
    return d / "ckpt", torch.load(d / "logits.pt")


def hf_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_merge_lora_dist_checkpoint(lora_ckpt, tiny_dirs, tmp_path):
    ckpt, saved = lora_ckpt
    assert saved["lora_b_max"] > 1e-3  # the adapter trained (lora_B starts at zero)
    assert main(["merge-lora", str(ckpt), str(tmp_path / "merged")]) == 0
    merged = hf_logits(tmp_path / "merged")
    assert (merged - saved["logits"]).abs().max().item() < 1e-4
    assert (hf_logits(tiny_dirs["llama"]) - saved["logits"]).abs().max().item() > 1e-2  # the adapter mattered
    # ADAPTER == CKPT (here the iteration directory) is the same merge.
    it = ckpt / "release"
    assert main(["merge-lora", str(it), str(it), str(tmp_path / "again")]) == 0
    assert torch.equal(hf_logits(tmp_path / "again"), merged)


def test_consolidate_refuses_lora_checkpoint(lora_ckpt, tmp_path):
    with pytest.raises(UsageError, match="unmerged LoRA adapters.*merge-lora"):
        main(["consolidate", str(lora_ckpt[0]), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_merge_lora_refuses_plain_dirs(tiny_dirs, tmp_path):
    with pytest.raises(UsageError, match="not a dist checkpoint"):
        main(["merge-lora", str(tiny_dirs["llama"]), str(tmp_path / "out")])


def test_lora_checkpoint_reloads_at_tp1(lora_ckpt, runtime):
    """ModelOpt restores the adapters at another TP; linear_fc1's lora_b (gate/up rows) included.
    (TP=1: loaded in this process, as lora_train.py's load mode does.)"""
    from post_training.config import ModelConfig, SourceConfig
    from post_training.inference import stage_forward
    from post_training.model_builder import setup_model

    ckpt, saved = lora_ckpt
    model, _, _ = setup_model(SourceConfig(load=str(ckpt)), ModelConfig(), runtime)
    with torch.inference_mode():
        logits = stage_forward(model, IDS, None).float()
    assert (logits - saved["logits"]).abs().max().item() < 1e-4
