"""Integration on the embedded SmolLM2-135M-Instruct: logits and greedy output equal
transformers' on the same weights, at TP=1 in process and TP=3 over 3 gloo ranks (9 query
and 3 KV heads: TP=3 is the smallest TP > 1 that divides them; TP=2 is refused)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_utils import torchrun
from post_training.config import SourceConfig
from post_training.hf import load_tokenizer
from post_training.model_builder import setup_model
from post_training.data import render_prompt
from post_training.generate import generate
from post_training.inference import stage_forward
from post_training.config import GenerateConfig
from post_training.config import ModelConfig

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(smollm2_dir, runtime):
    model, tok, _ = setup_model(SourceConfig(), ModelConfig(), runtime)
    return model, tok


def hf_greedy(hf_model, ids, n):
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_logits_match_transformers(ours, hf_model):
    model, tok = ours
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog. " * 6)["input_ids"]])
    with torch.inference_mode():
        diff = (stage_forward(model, ids, None) - hf_model(ids).logits).abs().max().item()
    print(f"SmolLM2 fp32 max |logits - transformers| = {diff:.3e} over {ids.size(1)} tokens")
    assert diff < 1e-3


def test_chat_answer_and_greedy_equality(ours, hf_model):
    model, tok = ours
    ids = render_prompt(QUESTION, tok)
    got = generate(model, ids, GenerateConfig(max_new_tokens=32))
    assert got == hf_greedy(hf_model, ids, 32)
    answer = tok.decode(got)
    assert "Paris" in answer, answer


def test_tp3_greedy_equals_transformers(smollm2_dir, hf_model, tmp_path):
    out = tmp_path / "tp3.pt"
    torchrun(3, "forward.py", "--hf-dir", str(smollm2_dir), "--tp", "3", "--out", str(out),
             "--max-new-tokens", "24", "--prompt", QUESTION)
    got = torch.load(out)
    with torch.inference_mode():
        ref_logits = hf_model(torch.tensor([got["ids"]])).logits
    diff = (got["logits"] - ref_logits).abs().max().item()
    print(f"SmolLM2 TP=3 max |logits - transformers| = {diff:.3e}")
    assert diff < 1e-3
    assert got["tokens"] == hf_greedy(hf_model, got["ids"], 24)
    assert "Paris" in load_tokenizer(smollm2_dir).decode(got["tokens"])
