"""Minitron pruning (post_training/pruning.py, scripts/prune.sh) on the tiny 4-layer llama:
depth 4 -> 2 against transformers with the same layers removed, width (FFN channels, query
heads) against the unpruned model with the removed channels' contributions zeroed, the pruned
checkpoint reloaded / evaluated / generated from / exported, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from dist_utils import clean_env, run_script
from post_training.config import CalibConfig, ModelConfig, SourceConfig
from post_training.utils import UsageError

TOKENS = torch.tensor([[1, 422, 3712, 314, 253, 1345, 28, 339, 2521, 2114, 30, 198, 504, 21, 47, 8]])


def _setup(runtime, src):
    from post_training.model_builder import setup_model

    return setup_model(src, ModelConfig(), runtime)


def _loop(tok):
    from post_training.inference import stage_forward
    from post_training.quantization.calibration import calibration_samples, forward_loop

    samples = calibration_samples(CalibConfig(calib_size=4, calib_seq_length=64), tok)
    return forward_loop(samples, lambda m, t: stage_forward(m, t, None), progress=False)


def _ids_logits(model):
    from post_training.inference import stage_forward
    from workers.ckpt import IDS  # the input of the workers' logits

    with torch.no_grad():
        return stage_forward(model, IDS, None).float()


def _logits(model):
    from post_training.inference import stage_forward

    with torch.no_grad():
        return stage_forward(model, TOKENS, None).float()


def test_depth_pruning_matches_transformers_without_the_dropped_layers(runtime, tiny_llama, tmp_path):
    """4 -> 2 layers: ModelOpt drops the two layers of lowest 1 - cos(in, out); the result equals
    the HF model with those layers deleted. The saved checkpoint reloads with the same logits
    (setup_model, as generate / evaluate / the training scripts load it) and exports to a
    transformers model with the same logits."""
    from transformers import AutoModelForCausalLM

    from post_training.config import ExportConfig, GenerateConfig
    from post_training.evaluation.perplexity import perplexity
    from post_training.export import export_model
    from post_training.generate import generate
    from post_training.pruning import check_targets, prune_model, save_pruned

    model, tok, hf_config = _setup(runtime, SourceConfig(pretrained_model_path=str(tiny_llama)))
    res = prune_model(model, check_targets({"num_layers": 2}, hf_config), _loop(tok))
    ranked = sorted(res.layer_scores, key=res.layer_scores.get, reverse=True)
    assert sorted(res.layer_scores) == [1, 2, 3, 4] and res.dropped == sorted(ranked[2:])
    assert model.config.num_layers == 2 and len(model.decoder.layers) == 2
    assert res.params_after < res.params_before and res.after["num_layers"] == 2
    pruned = _logits(model)

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    hf.model.layers = torch.nn.ModuleList(hf.model.layers[n - 1] for n in res.kept)
    hf.config.num_hidden_layers = 2
    with torch.no_grad():
        expected = hf(TOKENS, use_cache=False).logits
    torch.testing.assert_close(pruned, expected, atol=2e-4, rtol=1e-4)

    save = tmp_path / "pruned"
    save_pruned(model, runtime, save, tiny_llama, res.before, model_conf="test")
    cfg = json.loads((save / "hf_config" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["head_dim"] == 16
    assert cfg["pruned_from"] == {"num_hidden_layers": 4}
    # a model conf of the unpruned model still accepts it (its expectations are the sizes before)
    conf = tmp_path / "tiny.yaml"
    conf.write_text("hf_model_id: test/tiny\nexpect: {num_hidden_layers: 4, hidden_size: 64}\n")
    loaded, tok2, _ = _setup(runtime, SourceConfig(model_conf=str(conf), load=str(save)))
    torch.testing.assert_close(_logits(loaded), pruned)
    windows = [TOKENS[0].tolist()]
    assert perplexity(loaded, windows).nll_sum == pytest.approx(perplexity(model, windows).nll_sum)
    assert len(generate(loaded, TOKENS[0].tolist(), GenerateConfig(max_new_tokens=3))) == 3

    out = tmp_path / "hf"
    export_model(loaded, runtime, save / "hf_config", ExportConfig(export_dir=str(out)), torch.float32)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS, use_cache=False).logits, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_pp2_pruning_equals_tp1(runtime, tiny_llama, mr_dir, mr_pp2):
    """Pruning at PP=2 (Megatron-LM prunes at TP=1, PP allowed) ranks the layers as one stage
    does, drops the same ones (here a whole stage's), and its checkpoint reloads at PP=1."""
    from post_training.pruning import prune_model

    pp2 = mr_pp2["prune"]
    model, tok, _ = _setup(runtime, SourceConfig(pretrained_model_path=str(tiny_llama)))
    res = prune_model(model, {"num_layers": 2}, _loop(tok))
    assert pp2["dropped"] == res.dropped and pp2["params"] == res.params_after
    assert pp2["layer_scores"] == pytest.approx(res.layer_scores, rel=1e-4)
    loaded, _, _ = _setup(runtime, SourceConfig(load=str(mr_dir / "pruned-pp2")))
    torch.testing.assert_close(_ids_logits(loaded), pp2["logits"].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_ids_logits(model), pp2["logits"].float(), atol=1e-4, rtol=1e-4)


def _kept_columns(new: torch.Tensor, old: torch.Tensor, block: int = 1) -> list[int]:
    """Indices of ``old``'s column blocks that ``new``'s columns are, in order."""
    n_old = old.shape[1] // block
    out = []
    for j in range(new.shape[1] // block):
        col = new[:, j * block:(j + 1) * block]
        out += [i for i in range(n_old) if torch.equal(col, old[:, i * block:(i + 1) * block])][:1]
    assert len(out) == new.shape[1] // block
    return out


def test_width_pruning_keeps_the_ranked_channels_and_heads(runtime, tiny_llama, tmp_path):
    """FFN 128 -> 96 and query heads 4 -> 2 (one per KV group): the pruned model equals the
    unpruned one with the removed FFN channels' and heads' output columns zeroed. Then a hidden
    size cut (64 -> 48) that saves and reloads with the same logits (head_dim recorded)."""
    from post_training.pruning import check_targets, prune_model, save_pruned

    model, tok, hf_config = _setup(runtime, SourceConfig(pretrained_model_path=str(tiny_llama)))
    orig = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    targets = {"ffn_hidden_size": 96, "num_attention_heads": 2}
    res = prune_model(model, check_targets(targets, hf_config), _loop(tok))
    assert (res.after["ffn_hidden_size"], res.after["num_attention_heads"]) == (96, 2)
    pruned = _logits(model)

    ref, _, _ = _setup(runtime, SourceConfig(pretrained_model_path=str(tiny_llama)))
    with torch.no_grad():
        for i, layer in enumerate(model.decoder.layers):
            fc2, proj = layer.mlp.linear_fc2.weight, layer.self_attention.linear_proj.weight
            old_fc2 = orig[f"decoder.layers.{i}.mlp.linear_fc2.weight"]
            old_proj = orig[f"decoder.layers.{i}.self_attention.linear_proj.weight"]
            assert fc2.shape == (64, 96) and proj.shape == (64, 32)
            assert layer.self_attention.linear_qkv.weight.shape == ((2 + 2 * 2) * 16, 64)
            ffn_keep = _kept_columns(fc2, old_fc2)
            heads = _kept_columns(proj, old_proj, block=16)
            assert sorted(h // 2 for h in heads) == [0, 1]  # one query head of each KV group
            r = ref.decoder.layers[i]
            r.mlp.linear_fc2.weight[:, [c for c in range(128) if c not in ffn_keep]] = 0
            for h in set(range(4)) - set(heads):
                r.self_attention.linear_proj.weight[:, h * 16:(h + 1) * 16] = 0
    torch.testing.assert_close(pruned, _logits(ref), atol=2e-5, rtol=1e-4)

    res = prune_model(ref, check_targets({"hidden_size": 48}, hf_config), _loop(tok))
    assert res.after["hidden_size"] == 48 and ref.embedding.word_embeddings.weight.shape == (49152, 48)
    save = tmp_path / "narrow"
    save_pruned(ref, runtime, save, tiny_llama, res.before, model_conf="test")
    loaded, _, _ = _setup(runtime, SourceConfig(load=str(save)))
    torch.testing.assert_close(_logits(loaded), _logits(ref))

    import modelopt.torch.quantization as mtq  # pruning would drop a quantized model's state

    mtq.quantize(loaded, mtq.INT8_DEFAULT_CFG, lambda m: _logits(m))
    with pytest.raises(UsageError, match="carries ModelOpt state"):
        prune_model(loaded, {"num_layers": 2}, _loop(tok))


BAD = {
    "deeper": ('{"num_layers": 40}', "num_layers=40 is larger than the model's num_layers (4)"),
    "heads": ('{"num_attention_heads": 3}', "num_attention_heads=3 is not a multiple of num_query_groups (2)"),
    "groups": ('{"num_query_groups": 1}', "does not prune KV heads"),
    "unknown": ('{"num_experts": 2}', "unknown key num_experts"),
    "wider": ('{"ffn_hidden_size": 256}', "ffn_hidden_size=256 is larger than the model's ffn_hidden_size (128)"),
    # the embedded default model, known from its conf before anything loads
    "embedded": ('{"num_layers": 40}', "num_layers=40 is larger than the model's num_layers (30)"),
    "no save": ('{"num_layers": 2}', "prune.sh needs --save"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_fails_in_preflight(case, tiny_llama, tmp_path):
    from post_training.cli.prune import main

    target, needle = BAD[case]
    source = [] if case == "embedded" else ["--pretrained-model-path", str(tiny_llama)]
    save = [] if case == "no save" else ["--save", str(tmp_path)]
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        main(["--preflight", *source, *save, "--prune-export-config", target])


def test_prune_script_end_to_end_and_one_line_errors(tiny_llama, tmp_path):
    """prune.sh writes a checkpoint that states the pruned architecture and reports the layers,
    parameters and perplexity; TP=2 is one error line, exit 2, before any rank starts."""
    save, out = tmp_path / "ckpt", tmp_path / "report.json"
    res = run_script("prune.sh", "--prune-export-config", '{"num_layers": 2}', "--calib-size", "2",
                     "--calib-seq-length", "32", "--prune-ppl-windows", "1", "--json-out", str(out),
                     env=clean_env(HF_MODEL_CKPT=str(tiny_llama), MLM_MODEL_SAVE=str(save)))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["after"]["num_layers"] == 2 and len(report["dropped"]) == 2
    assert report["params_after"] < report["params_before"] and report["perplexity_after"] > 0
    assert "layers dropped (2)" in res.stdout and "| num_layers | 4 | 2 |" in res.stdout
    assert json.loads((save / "hf_config" / "config.json").read_text())["num_hidden_layers"] == 2
    res = run_script("prune.sh", "--prune-export-config", '{"num_layers": 2}',
                     env=clean_env(TP="2", MLM_MODEL_SAVE=str(tmp_path / "x")))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and lines[-1].startswith("error: pruning runs at TP=1"), res.stderr[-2000:]
