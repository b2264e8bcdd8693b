"""PTQ: config resolution, calibration data, scripts/quantize.sh end to end over gloo ranks."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dist_utils import PY, ROOT, clean_env, run_script, torchrun
from post_training.quantization.calibration import calibration_samples
from post_training.quantization.recipes import available_formats, resolve_quant_cfg
from post_training.config import CalibConfig, QuantizeConfig
from post_training.utils import UsageError


def test_config_by_name_recipe_and_kv_cache(tmp_path):
    assert {"FP8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG", "NVFP4_DEFAULT_CFG",
            "MXFP8_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG"} <= set(available_formats())
    with pytest.raises(UsageError, match="unknown quantization config 'FP9'.*FP8_DEFAULT_CFG"):
        resolve_quant_cfg("FP9")
    cfg = resolve_quant_cfg("FP8_DEFAULT_CFG", "fp8")
    assert any(e.get("quantizer_name") == "*[kv]_bmm_quantizer" for e in cfg["quant_cfg"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant_cfg:\n  - {quantizer_name: '*', enable: false}\n"
                      "  - {quantizer_name: '*weight_quantizer', cfg: {num_bits: 8, axis: 0}}\nalgorithm: max\n")
    assert resolve_quant_cfg(str(recipe))["algorithm"] == "max"
    recipe.write_text("quant_cfg: [unclosed\n")
    with pytest.raises(UsageError, match="does not parse"):
        resolve_quant_cfg(str(recipe))
    recipe.write_text("algorithm: max\n")
    with pytest.raises(UsageError, match="needs a 'quant_cfg' list"):
        resolve_quant_cfg(str(recipe))
    with pytest.raises(UsageError, match="export-kv-cache-quant"):
        QuantizeConfig(kv_cache_quant="int3")
    # a recipe on top of a named config: its entries come after the base's, so they win
    shipped = resolve_quant_cfg(str(Path(__file__).parents[1] / "examples/quantization/int8_sq_fc2_act16.yaml"))
    import modelopt.torch.quantization as mtq

    assert shipped["algorithm"] == "smoothquant"
    assert shipped["quant_cfg"][:-2] == mtq.INT8_SMOOTHQUANT_CFG["quant_cfg"]
    assert shipped["quant_cfg"][-2] == {"quantizer_name": "*linear_fc2.input_quantizer", "enable": False}
    recipe.write_text("base: INT9_CFG\n")
    with pytest.raises(UsageError, match="unknown base 'INT9_CFG'"):
        resolve_quant_cfg(str(recipe))


def test_calibration_sources(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert [len(s) for s in calibration_samples(CalibConfig(calib_size=3, calib_seq_length=64), tok)] == [64] * 3
    chat = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Tell me about tides. " * 20}, {"role": "assistant", "content": "Tides " * 40}]
    chat.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(4)))
    samples = calibration_samples(CalibConfig(calib_dataset=str(chat), calib_size=2, calib_seq_length=64), tok)
    assert "<|im_start|>user" in tok.decode(samples[0])  # rendered with the chat template
    with pytest.raises(UsageError, match="has .* tokens: .* fewer than --calib-size 500"):
        calibration_samples(CalibConfig(calib_dataset=str(chat), calib_size=500, calib_seq_length=64), tok)
    with pytest.raises(UsageError, match="not found"):
        calibration_samples(CalibConfig(calib_dataset=str(tmp_path / "no.jsonl")), tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UsageError, match="is empty"):
        calibration_samples(CalibConfig(calib_dataset=str(tmp_path / "empty.txt")), tok)


def load_at(tp: int, save, tmp_path, runtime=None) -> dict:
    """Logits and amax of a checkpoint loaded at TP=tp: a 2-rank launch, or TP=1 in this process."""
    if tp == 1:
        from workers import ckpt

        return ckpt.outputs(ckpt.build(runtime, load=str(save)), runtime)
    out = tmp_path / f"tp{tp}.pt"
    torchrun(tp, "ckpt.py", "load", "--load", str(save), "--tp", str(tp), "--out", str(out))
    return torch.load(out)


QUANT_ARGS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "FP8_DEFAULT_CFG", "--export-kv-cache-quant", "fp8",
              "--calib-size", "2", "--calib-seq-length", "32", "--max-new-tokens", "4", "--ppl-windows", "0")


def checkpoint_contents(root, tmp) -> dict:
    """Every entry of a saved iteration's DCP (weights, quantizer amax, ModelOpt's per-module
    state) read offline, the serialized extra state deserialized: torch.save archives are not
    byte-for-byte reproducible, their contents are."""
    import io

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(root / "release", tmp)
    out = {}
    for key, value in torch.load(tmp, weights_only=False).items():
        if key.rsplit("/", 1)[0].endswith("._extra_state") and isinstance(value, list):
            value = [torch.load(io.BytesIO(v.numpy().tobytes()), weights_only=False) for v in value]
        out[key] = value
    return out


def assert_same(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_quantize_script_tp2_checkpoint_reloads(tiny_llama, tmp_path, runtime):
    """quantize.sh at TP=2 saves a checkpoint that reloads (TP=2 and TP=1) to identical logits;
    without its modelopt_state it is refused with one line. `torchrun --nproc-per-node 2
    scripts/quantize.sh` (the script itself under torchrun, TP from the world size) writes the
    same checkpoint (every tensor and quantizer state equal)."""
    save = tmp_path / "q"
    res = run_script("quantize.sh", *QUANT_ARGS, "--verbose",
                     env=clean_env(TP="2", HF_MODEL_CKPT=str(tiny_llama), MLM_MODEL_SAVE=str(save)))
    assert res.returncode == 0, res.stderr[-3000:]
    env = clean_env(HF_MODEL_CKPT=str(tiny_llama), MLM_MODEL_SAVE=str(tmp_path / "q_torchrun"))
    launched = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-port", env["MASTER_PORT"], str(ROOT / "scripts" / "quantize.sh"),
                               *QUANT_ARGS], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same(checkpoint_contents(tmp_path / "q_torchrun", tmp_path / "b.pt"),
                checkpoint_contents(save, tmp_path / "a.pt"))
    assert "quantization summary (PP stage 0, TP rank 0 of 2)" in res.stdout
    assert "k_bmm_quantizer" in res.stdout and "----- after -----" in res.stdout
    meta = json.loads((save / "release" / "toolkit_meta.json").read_text())
    assert meta["modelopt_modes"] and meta["parallel"]["tp"] == 2
    outs = [load_at(2, save, tmp_path), load_at(1, save, tmp_path, runtime)]
    assert (outs[0]["logits"] - outs[1]["logits"]).abs().max().item() < 1e-4
    shutil.rmtree(save / "release" / "modelopt_state")
    res = run_script("generate.sh", "--max-new-tokens", "2", env=clean_env(MLM_MODEL_CKPT=str(save)))
    assert res.returncode == 2 and "modelopt_state/ is missing" in res.stderr


def test_auto_quantize_flags():
    with pytest.raises(UsageError, match="needs --auto-quantize-bits"):
        QuantizeConfig(quant_cfg="auto")
    with pytest.raises(UsageError, match="only applies to --export-quant-cfg auto"):
        QuantizeConfig(quant_cfg="FP8_DEFAULT_CFG", auto_bits=6.0)
    from post_training.quantization.recipes import auto_formats

    with pytest.raises(UsageError, match="unknown FP9_CFG; valid: .*INT4_AWQ_CFG"):
        auto_formats(QuantizeConfig(quant_cfg="auto", auto_bits=6.0, auto_formats="FP8_DEFAULT_CFG,FP9_CFG"))
    # auto's own config is only the KV-cache part: everything else comes from the search
    assert resolve_quant_cfg("auto", "none")["quant_cfg"] == [{"quantizer_name": "*", "enable": False}]
    assert any("bmm" in e["quantizer_name"] for e in resolve_quant_cfg("auto", "fp8")["quant_cfg"])


@pytest.mark.slow
def test_auto_quantize_tp2_mixes_formats_and_reloads(tiny_llama, tmp_path, runtime):
    """auto at TP=2 picks per-layer formats under the bits budget, quantizes the KV cache on top,
    and the checkpoint reloads at TP=2 and TP=1 to the same logits (which differ from the
    unquantized model's). NVFP4 (blocks of 16) rather than INT4-AWQ (blocks of 128): the tiny
    model's row-parallel layers have 32 inputs per rank, and 128-blocks split across ranks
    cannot be resharded (the load refuses them, naming the tensor)."""
    save = tmp_path / "auto"
    res = run_script("quantize.sh", "HuggingFaceTB/SmolLM2-135M-Instruct", "auto", "--auto-quantize-bits", "6",
                     "--auto-quantize-formats", "NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG",
                     "--export-kv-cache-quant", "fp8", "--calib-size", "4", "--calib-seq-length", "32",
                     "--max-new-tokens", "2",
                     env=clean_env(TP="2", HF_MODEL_CKPT=str(tiny_llama), MLM_MODEL_SAVE=str(save)))
    assert res.returncode == 0, res.stderr[-3000:]
    chosen = [ln.split()[-1] for ln in res.stdout.splitlines() if ln.startswith("  auto-quantize: decoder.")]
    assert len(chosen) == 16  # 4 layers x (qkv, proj, fc1, fc2)
    assert "NVFP4_DEFAULT_CFG" in chosen and {"FP8_DEFAULT_CFG", "NONE"} & set(chosen)  # a mix
    bits = float(res.stdout.split("effective bits ")[1].split()[0])
    assert 4.0 < bits <= 6.0 and "(budget 6, met)" in res.stdout
    outs = {2: load_at(2, save, tmp_path), 1: load_at(1, save, tmp_path, runtime)}
    from transformers import AutoModelForCausalLM
    from workers.ckpt import IDS

    with torch.no_grad():  # the unquantized model's logits (the toolkit equals transformers here)
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(IDS).logits
    assert (outs[2]["logits"] - outs[1]["logits"]).abs().max().item() < 1e-4
    assert (outs[1]["logits"] - ref).abs().max().item() > 1e-3
    kv = [n for n in outs[1]["amax"][0] if n.endswith("k_bmm_quantizer")]
    assert len(kv) == 4  # the KV cache was calibrated on top of the search
