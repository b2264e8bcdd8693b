"""scripts/export.sh / post_training.export: unified HF checkpoints through ModelOpt's
export_mcore_gpt_to_hf that transformers loads from EXPORT_DIR alone, bit-identical from TP=2 and
PP=2 (ModelOpt alone writes each TP rank's slice under the full name: the toolkit gathers), FP8
as ModelOpt writes it, HF shard layout, and one-line refusals."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_utils import clean_env, run_script
from post_training.config import SourceConfig
from post_training.hf import source_hf_dir
from post_training.model_builder import setup_model
from post_training.data import render_prompt
from post_training.export import export_model, export_problem
from post_training.io.formats import parse_size
from post_training.config import ExportConfig
from post_training.generate import generate
from post_training.inference import stage_forward
from post_training.config import GenerateConfig
from post_training.config import ModelConfig
from post_training.utils import UsageError

QUESTION = "What is the capital of France?"
CALIB = torch.arange(3, 40).unsqueeze(0) * 7 % 4000


def tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k  # bits


def one_line_error(res, needle: str) -> None:
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr[-3000:]
    assert needle in lines[0], lines[0]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    return model


@pytest.fixture(scope="module")
def exported(tiny, runtime, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-hf"
    export_model(tiny, runtime, tiny_llama, ExportConfig(export_dir=str(out)), torch.float32)
    return out


def test_export_loads_in_transformers(exported, tiny, tiny_llama):
    """EXPORT_DIR alone: weights, config, generation config, tokenizer with chat template."""
    names = {p.name for p in exported.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= names, names
    assert not names & {"model.safetensors.index.json", "hf_quant_config.json"}
    assert not any(n.endswith(".json") and n.startswith("model-") for n in names)  # ModelOpt's parts
    tok = AutoTokenizer.from_pretrained(exported)
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = render_prompt(QUESTION, tok)
    with torch.inference_mode():
        diff = (hf(torch.tensor([ids])).logits - ref(torch.tensor([ids])).logits).abs().max().item()
        ours = (stage_forward(tiny, torch.tensor([ids]), None) - hf(torch.tensor([ids])).logits).abs().max().item()
    print(f"export vs original HF: max |logits diff| = {diff:.2e}; vs toolkit = {ours:.2e}")
    assert diff <= 1e-5 and ours <= 1e-4
    assert hf_greedy(hf, ids, 16) == generate(tiny, ids, GenerateConfig(max_new_tokens=16))


def test_small_shard_size_writes_an_index(tiny, runtime, tiny_llama, exported, tmp_path):
    out = tmp_path / "sharded"
    export_model(tiny, runtime, tiny_llama, ExportConfig(export_dir=str(out), max_shard_size=parse_size("100KB")),
                 torch.float32)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    for p in shards:  # a shard over the limit holds one tensor (the 12.6 MB embedding)
        with safe_open(p, "pt") as f:
            assert p.stat().st_size <= 100_000 + 4096 or len(list(f.keys())) == 1
    assert_same_tensors(tensors(out), tensors(exported))
    hf = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(exported)
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), ref.state_dict().values()))


@pytest.mark.slow
def test_pp2_export_equals_tp1(tiny_llama, exported, tmp_path):
    out = tmp_path / "pp2"
    res = run_script("export.sh", env=clean_env(PP="2", HF_MODEL_CKPT=str(tiny_llama), EXPORT_DIR=str(out)))
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name


@pytest.mark.slow
def test_fp8_tp2_checkpoint_exports_as_modelopt_does(tiny_llama, runtime, tmp_path, mr_dir, mr_tp2):
    """FP8 weights + FP8 KV cache calibrated and saved at TP=2, exported at TP=2 (gathered):
    hf_quant_config.json names FP8, weights are FP8 with per-tensor scales, and every tensor
    equals what ModelOpt's exporter writes from the same checkpoint at TP=1."""
    from modelopt.torch.export import export_mcore_gpt_to_hf

    ckpt, out, raw = mr_dir / "fp8", tmp_path / "fp8-hf", tmp_path / "raw"  # saved by the TP=2 launch
    res = run_script("export.sh", env=clean_env(TP="2", MLM_MODEL_CKPT=str(ckpt), EXPORT_DIR=str(out)))
    assert res.returncode == 0, res.stderr[-3000:]
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8" and q["kv_cache_quant_algo"] == "FP8"
    assert "model.embed_tokens" in q["exclude_modules"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    got = tensors(out)
    w = "model.layers.1.self_attn.q_proj."
    assert got[w + "weight"].dtype == torch.float8_e4m3fn and got[w + "weight_scale"].numel() == 1
    assert got[w + "input_scale"].dtype == torch.float32
    assert "model.layers.1.self_attn.k_scale" in got and "model.layers.1.self_attn.v_scale" in got
    orig = load_file(tiny_llama / "model.safetensors")[w + "weight"]
    deq = got[w + "weight"].float() * got[w + "weight_scale"]
    assert (deq - orig).abs().max() <= orig.abs().max() / 16  # e4m3: 3 mantissa bits

    src = SourceConfig(load=str(ckpt))
    model, _, _ = setup_model(src, ModelConfig(), runtime)  # the runtime completed the exporter's imports
    raw.mkdir()
    export_mcore_gpt_to_hf(model, str(source_hf_dir(src)), dtype=torch.float32, export_dir=str(raw))
    assert_same_tensors(got, tensors(raw))


@pytest.mark.parametrize("cfg_name,needle", [("INT8_WEIGHT_ONLY_CFG", "format int8_wo"),
                                             ("MXFP8_DEFAULT_CFG", "format mxfp8"),
                                             ("FP8_KV_CFG", "KV-cache-only")])
def test_unsupported_format_is_refused(tiny_llama, runtime, tmp_path, cfg_name, needle):
    import modelopt.torch.quantization as mtq

    model, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    cfg = getattr(mtq, cfg_name)
    if cfg_name == "FP8_KV_CFG":
        cfg = mtq.update_quant_cfg_with_kv_cache_quant({"quant_cfg": None}, cfg["quant_cfg"])
    mtq.quantize(model, cfg, lambda m: stage_forward(m, CALIB, None))
    with pytest.raises(UsageError, match=needle):
        export_model(model, runtime, tiny_llama, ExportConfig(export_dir=str(tmp_path / "x")), torch.float32)
    assert not list(tmp_path.iterdir())


def test_block_formats_refused_at_tp2():
    assert export_problem({"nvfp4"}, set(), 1) is None and export_problem({"fp8"}, {"FP8"}, 2) is None
    assert "TP=2 supports unquantized and FP8 models, not nvfp4" in export_problem({"nvfp4"}, set(), 2)


def test_failed_export_leaves_previous_export(tiny, runtime, tiny_llama, tmp_path):
    """ModelOpt's self-check fails after every shard is written (the source has a decoder tensor
    the export lacks): the export dir keeps its old content and no staging debris remains."""
    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    sd = load_file(src / "model.safetensors")
    sd["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, src / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="Export dropped 1 tensor"):
        export_model(tiny, runtime, src, ExportConfig(export_dir=str(out), overwrite=True), torch.float32)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_overwrite_replaces(tiny, runtime, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    with pytest.raises(UsageError, match="not empty"):
        ExportConfig(export_dir=str(out)).validate(SourceConfig())
    export_model(tiny, runtime, tiny_llama, ExportConfig(export_dir=str(out), overwrite=True), torch.float32)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing", "not_empty"])
def test_bad_input_one_line(case, tiny_llama, tmp_path):
    env = clean_env(HF_MODEL_CKPT=str(tiny_llama))
    needle = "export needs --export-dir (EXPORT_DIR)"
    if case == "not_empty":
        (tmp_path / "keep.txt").write_text("x")
        env["EXPORT_DIR"], needle = str(tmp_path), "is not empty (pass --overwrite"
    one_line_error(run_script("export.sh", env=env), needle)


def test_export_dir_may_not_replace_the_source(tiny_llama):
    for src in (SourceConfig(pretrained_model_path=str(tiny_llama)), SourceConfig(load=str(tiny_llama))):
        for out in (tiny_llama, tiny_llama.parent):
            with pytest.raises(UsageError, match="would replace the model's source"):
                ExportConfig(export_dir=str(out), overwrite=True).validate(src)
    ExportConfig(export_dir=str(tiny_llama / "hf"), overwrite=True).validate(src)  # inside it is fine


@pytest.mark.slow
def test_smollm2_export_greedy_equals_toolkit(smollm2_dir, runtime, tmp_path):
    """The embedded SmolLM2-135M-Instruct, exported: transformers from EXPORT_DIR answers the
    chat question token for token as the toolkit does."""
    src = SourceConfig()
    model, tok, _ = setup_model(src, ModelConfig(), runtime)
    out = tmp_path / "smol-hf"
    export_model(model, runtime, source_hf_dir(src), ExportConfig(export_dir=str(out)), torch.float32)
    ids = render_prompt(QUESTION, AutoTokenizer.from_pretrained(out))
    assert ids == render_prompt(QUESTION, tok)
    ours = generate(model, ids, GenerateConfig(max_new_tokens=24))
    theirs = hf_greedy(AutoModelForCausalLM.from_pretrained(out).eval(), ids, 24)
    assert theirs == ours and "Paris" in tok.decode(ours)
