"""scripts/generate.sh end to end: answers between markers, and one clear line per bad input."""
import json
import shutil
import subprocess

import pytest

from dist_utils import PY, ROOT, clean_env, run_script


def error_lines(res):
    return [l for l in res.stderr.splitlines() if l.strip()]


def assert_one_line_error(res, needle):
    assert res.returncode != 0, res.stdout
    lines = error_lines(res)
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr[-3000:]
    assert needle in lines[0]


@pytest.mark.slow
def test_generate_script_prints_answers_between_markers(tiny_llama, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    out = tmp_path / "answers.json"
    res = run_script("generate.sh", "--prompts-file", str(prompts), "--max-new-tokens", "5",
                     "--json-out", str(out), env=clean_env(HF_MODEL_CKPT=str(tiny_llama)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "===== PROMPT 0 =====" in res.stdout and "===== ANSWER 0 =====" in res.stdout
    assert "===== END 0 =====" in res.stdout and "layer spec: local + SDPA attention" in res.stdout
    answers = json.loads(out.read_text())
    assert len(answers) == 1 and len(answers[0]["tokens"]) == 5


@pytest.mark.parametrize("case", ["conf", "hf_dir", "tp_heads", "prompts_json", "cuda", "world", "flag"])
def test_bad_input(case, tiny_llama, tmp_path):
    env, args = clean_env(), []
    if case == "conf":
        args, needle = ["No/Such-Model"], "unknown model conf"
    elif case == "hf_dir":
        env["HF_MODEL_CKPT"], needle = str(tmp_path / "missing"), "HF model directory not found"
    elif case == "tp_heads":
        env["TP"], needle = "2", "must divide the attention heads (9)"
    elif case == "prompts_json":
        (tmp_path / "p.json").write_text("[\"unterminated")
        args, needle = ["--prompts-file", str(tmp_path / "p.json")], "not valid JSON"
    elif case == "cuda":
        env["HF_MODEL_CKPT"], args, needle = str(tiny_llama), ["--device", "cuda"], "CUDA was requested"
    elif case == "world":
        env.update(TP="2", NNODES="3")
        needle = "cannot be split evenly"
    else:
        args, needle = ["--max-new-tokens", "x"], "invalid int value"
    assert_one_line_error(run_script("generate.sh", *args, env=env), needle)


def test_no_chat_template(tiny_llama, tmp_path):
    d = tmp_path / "nochat"
    shutil.copytree(tiny_llama, d)
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    res = run_script("generate.sh", "--max-new-tokens", "2", env=clean_env(HF_MODEL_CKPT=str(d)))
    assert_one_line_error(res, "no chat template")


@pytest.mark.slow
def test_convert_then_generate_from_checkpoint(tiny_llama, tmp_path, runtime):
    """scripts/convert.sh at PP=2 writes a dist checkpoint that generate.sh loads at TP=2 via
    MLM_MODEL_CKPT (no HF dir needed), answering exactly as from the HF model."""
    save = tmp_path / "ckpt"
    res = run_script("convert.sh", env=clean_env(PP="2", HF_MODEL_CKPT=str(tiny_llama), MLM_MODEL_SAVE=str(save)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "release"
    from post_training.cli import generate

    ref = tmp_path / "hf.json"  # the HF model's answers: the entry point in this process (TP=1)
    assert generate.main(["--pretrained-model-path", str(tiny_llama), "--max-new-tokens", "8",
                          "--json-out", str(ref)]) == 0
    out = tmp_path / "ckpt.json"
    res = run_script("generate.sh", "--max-new-tokens", "8", "--json-out", str(out),
                     env=clean_env(MLM_MODEL_CKPT=str(save), TP="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["tokens"] for r in json.loads(ref.read_text())] == [r["tokens"] for r in json.loads(out.read_text())]


def test_convert_needs_save():
    assert_one_line_error(run_script("convert.sh", env=clean_env()), "convert needs --save")


def test_pp_must_divide_layers():
    assert_one_line_error(run_script("generate.sh", env=clean_env(PP="4")), "PP=4 must divide the number of layers (30)")


def test_convert_script_dispatches_checkpoint_tools(tiny_llama, tmp_path):
    """convert.sh COMMAND runs the checkpoint tools (no torchrun); other first arguments still
    mean a model conf."""
    res = run_script("convert.sh", "inspect", str(tiny_llama), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["kind"] == "hf-model" and rep["architecture"].startswith("LlamaForCausalLM")
    res = run_script("convert.sh", "inspect", str(tmp_path / "nothing"))
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1


TASK_SCRIPTS = ("convert", "distill", "eagle3", "evaluate", "export", "finetune", "generate", "mmlu", "prune",
                "quantize")


def test_every_script_has_help_with_its_env_and_runs_as_python():
    """`--help` of every task script lists its flags and the environment variables behind them;
    each script is also valid python (torchrun runs it so), and that python hands over to bash."""
    for name in TASK_SCRIPTS:
        path = ROOT / "scripts" / f"{name}.sh"
        compile(path.read_text(), str(path), "exec")  # torchrun's interpreter accepts the file
        res = run_script(f"{name}.sh", "--help")
        assert res.returncode == 0, (name, res.stderr[-2000:])
        for text in ("--tensor-model-parallel-size", "[env TP]", "MLM_EXTRA_ARGS", "NNODES", f"scripts/{name}.sh"):
            assert text in res.stdout, (name, text)
    assert "[env MLM_MODEL_SAVE]" in run_script("quantize.sh", "--help").stdout
    assert "[env EXPORT_DIR]" in run_script("export.sh", "--help").stdout


def test_outside_torchrun_layout_mismatch_is_one_line(tiny_llama):
    env = clean_env(HF_MODEL_CKPT=str(tiny_llama), TP="1", DP="1")
    res = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          env["MASTER_PORT"], str(ROOT / "scripts" / "generate.sh")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode != 0
    ours = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert ours == ["error: torchrun started 2 ranks but TP*PP*DP = 1*1*1 = 1"]
