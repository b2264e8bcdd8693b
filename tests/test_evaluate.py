"""Perplexity and MMLU-format accuracy (scripts/evaluate.sh): equal to transformers on a tiny model,
TP=2 equal to TP=1, the report formats, and one clear line per bad input."""
import contextlib
import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dist_utils import ROOT, clean_env, run_script
from post_training.checkpointing import save_checkpoint
from post_training.config import SourceConfig
from post_training.model_builder import setup_model
from post_training.cli.evaluate import main
from post_training.evaluation.inputs import eval_windows, load_eval_text, load_questions, prompt
from post_training.evaluation.perplexity import perplexity
from post_training.config import EvalConfig
from post_training.config import ModelConfig
from post_training.evaluation.mmlu import score
from post_training.utils import UsageError

EXAMPLE = ROOT / "examples" / "eval" / "mmlu_general_knowledge.csv"
SEQ, CHUNKS, MBS = 64, 6, 4  # 6 windows in micro-batches of 4: one full, one partial
ARGS = ["--seq-length", str(SEQ), "--eval-max-chunks", str(CHUNKS), "--micro-batch-size", str(MBS)]
LAST_LINE = re.compile(r"^perplexity (\S+)$")


@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    cfg = EvalConfig(max_chunks=CHUNKS)
    return model, tok, ref, eval_windows(load_eval_text(cfg), tok, cfg, SEQ)


def transformers_ppl(ref, windows) -> float:
    """exp of the mean next-token NLL over all windows, computed by transformers alone."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = ref(ids).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += len(w) - 1
    return math.exp(nll / n)


def test_perplexity_equals_transformers(tiny):
    model, _, ref, windows = tiny
    assert len(windows) == CHUNKS and all(len(w) == SEQ for w in windows)
    res = perplexity(model, windows, micro_batch_size=MBS)
    want = transformers_ppl(ref, windows)
    print(f"tiny llama: ours {res.perplexity:.6f} transformers {want:.6f}")
    assert res.tokens == CHUNKS * (SEQ - 1) and res.chunks == CHUNKS
    assert abs(res.perplexity - want) / want < 1e-4
    assert abs(perplexity(model, windows, micro_batch_size=1).nll - res.nll) < 1e-6


def reference_scores(ref, tok, path: Path) -> torch.Tensor:
    """Log-likelihood of " A".." D" after the documented zero-shot prompt, built here from the
    csv with transformers alone."""
    out = []
    with path.open(newline="") as f, torch.no_grad():
        for row in csv.DictReader(f):
            text = (f"The following are multiple choice questions (with answers) about "
                    f"{row['subject'].replace('_', ' ')}.\n\n{row['question']}\n"
                    + "".join(f"{l}. {row[l]}\n" for l in "ABCD") + "Answer:")
            ctx = tok(text)["input_ids"]
            scores = []
            for letter in "ABCD":
                ids = tok(f"{text} {letter}")["input_ids"]
                logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
            out.append(scores)
    return torch.tensor(out, dtype=torch.float64)


def test_mmlu_accuracy_equals_transformers(tiny):
    model, tok, ref, _ = tiny
    questions = load_questions(EXAMPLE)
    assert len(questions) == 12 and sorted({q.answer for q in questions}) == [0, 1, 2, 3]
    assert prompt(questions[0]) == ("The following are multiple choice questions (with answers) about "
                                    "geography.\n\nWhat is the capital of France?\nA. Berlin\nB. Madrid\n"
                                    "C. Paris\nD. Rome\nAnswer:")
    res = score(model, questions, tok, micro_batch_size=5)  # 3 micro-batches, padded rows
    want = reference_scores(ref, tok, EXAMPLE)
    print(f"tiny llama mmlu accuracy {res.accuracy:.4f}, max |loglik - transformers| "
          f"{(res.loglik - want).abs().max().item():.2e}")
    assert torch.allclose(res.loglik, want, rtol=1e-4, atol=1e-4)
    assert res.predictions == want.argmax(1).tolist()
    assert 0.0 <= res.accuracy <= 1.0
    answers = torch.tensor([q.answer for q in questions])
    assert res.accuracy == (want.argmax(1) == answers).double().mean().item()


def test_mmlu_jsonl_equals_csv(tmp_path):
    rows = list(csv.DictReader(EXAMPLE.open(newline="")))
    lines = [json.dumps({"question": r["question"], "choices": [r[l] for l in "ABCD"],
                         "answer": "ABCD".index(r["answer"]), "subject": r["subject"]}) for r in rows]
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "plain.csv").write_text("".join(  # the original headerless MMLU layout
        ",".join(json.dumps(r[k]) for k in ("question", "A", "B", "C", "D", "answer")) + "\n" for r in rows))
    assert load_questions(tmp_path / "q.jsonl") == load_questions(EXAMPLE)
    headerless = load_questions(tmp_path / "plain.csv")
    assert [(q.question, q.choices, q.answer) for q in headerless] == \
        [(q.question, q.choices, q.answer) for q in load_questions(EXAMPLE)]
    assert "about" not in prompt(headerless[0]).splitlines()[0]


def test_dataset_sources_agree(tmp_path, tiny):
    _, tok, _, _ = tiny
    paras = ["First paragraph about lists and tuples.", "Second one, about dictionaries.", "Third."]
    (tmp_path / "t.txt").write_text("\n\n".join(paras))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"content": p}) + "\n" for p in paras))
    from_text = load_eval_text(EvalConfig(text_path=str(tmp_path / "t.txt")))
    from_ds = load_eval_text(EvalConfig(dataset=str(tmp_path / "d.jsonl"), dataset_field="content",
                                        dataset_split="validation"))
    assert from_text == from_ds
    cfg = EvalConfig(text_path=str(tmp_path / "t.txt"), max_chunks=2)
    assert eval_windows(from_text, tok, cfg, 4) == eval_windows(from_text, tok, EvalConfig(), 4)[:2]


@pytest.fixture(scope="module")
def tp1_run(tiny, tiny_llama, tmp_path_factory):
    """The entry point in process at TP=1 (the TP=2 test runs the script itself)."""
    out = tmp_path_factory.mktemp("eval") / "tp1.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--pretrained-model-path", str(tiny_llama), *ARGS, "--mmlu-path", str(EXAMPLE),
                     "--json-out", str(out)]) == 0
    return buf.getvalue(), json.loads(out.read_text())


def test_last_line_and_json(tp1_run, tiny, tiny_llama):
    stdout, report = tp1_run
    m = LAST_LINE.match(stdout.strip().splitlines()[-1])
    assert m, stdout[-2000:]
    model, _, _, windows = tiny
    assert float(m.group(1)) == pytest.approx(report["perplexity"], rel=1e-9, abs=1e-6)
    assert report["perplexity"] == pytest.approx(perplexity(model, windows, MBS).perplexity, rel=1e-9)
    assert report["nll"] == pytest.approx(math.log(report["perplexity"]))
    assert {k: report[k] for k in ("tokens", "chunks", "seq_length", "source", "model", "tp", "pp")} == {
        "tokens": CHUNKS * (SEQ - 1), "chunks": CHUNKS, "seq_length": SEQ, "source": "builtin:eval",
        "model": str(tiny_llama), "tp": 1, "pp": 1}
    assert report["seconds"] > 0 and 0.0 <= report["accuracy"] <= 1.0
    assert report["mmlu"]["total"] == 12 and report["mmlu"]["correct"] == round(12 * report["accuracy"])
    assert f"mmlu accuracy {report['accuracy']:.4f}" in stdout


@pytest.mark.slow
def test_tp2_equals_tp1(tp1_run, tiny_llama, tmp_path):
    out = tmp_path / "tp2.json"
    res = run_script("evaluate.sh", *ARGS, "--json-out", str(out),
                     env=clean_env(TP="2", HF_MODEL_CKPT=str(tiny_llama)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert LAST_LINE.match(res.stdout.strip().splitlines()[-1]), res.stdout[-2000:]
    tp2, tp1 = json.loads(out.read_text()), tp1_run[1]
    rel = abs(tp2["perplexity"] - tp1["perplexity"]) / tp1["perplexity"]
    print(f"TP=1 {tp1['perplexity']:.6f} TP=2 {tp2['perplexity']:.6f} relative diff {rel:.2e}")
    assert tp2["tp"] == 2 and tp2["tokens"] == tp1["tokens"] and rel < 1e-5


def test_dist_checkpoint_equals_hf(tiny, tiny_llama, runtime, tmp_path, capsys):
    """--load of a dist checkpoint (MLM_MODEL_CKPT) evaluates like the HF directory it came from."""
    model, _, _, windows = tiny
    save_checkpoint(model, runtime, tmp_path / "ckpt", None, hf_dir=tiny_llama)
    capsys.readouterr()
    assert main(["--load", str(tmp_path / "ckpt"), *ARGS]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"perplexity {perplexity(model, windows, MBS).perplexity:.6f}"


SHORT = "Just a few words."
Q = '{"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": "%s"}\n'
BAD = {  # case: (file name, content, flag, expected text); content None = no file written
    "missing": ("nope.txt", None, "--eval-text-path", "eval text file not found"),
    "empty": ("e.txt", " \n", "--eval-text-path", "is empty"),
    "short": ("s.txt", SHORT, "--eval-text-path", f"tokens, fewer than one --seq-length window of {SEQ}"),
    "field": ("d.jsonl", '{"content": "x"}\n', "--eval-dataset",
              "has no field 'text' (--eval-dataset-field); fields: content"),
    "mmlu_missing": ("no.csv", None, "--mmlu-path", "MMLU file not found"),
    "mmlu_letter": ("q.jsonl", Q % "A" + Q % "E", "--mmlu-path", "line 2: answer must be a letter A-D"),
    "mmlu_choices": ("q.jsonl", '{"question": "Q?", "choices": ["a"], "answer": "A"}', "--mmlu-path",
                     "line 1: expected 4 non-empty choices"),
    "mmlu_json": ("q.jsonl", Q % "A" + "{oops\n", "--mmlu-path", "line 2 is not valid JSON"),
    "mmlu_columns": ("q.csv", "question,A,B,C,D,answer\nQ?,a,b,c,d\n", "--mmlu-path",
                     "row 2: expected 6 columns, got 5"),
    "mmlu_suffix": ("q.txt", "Q?", "--mmlu-path", "expected a .csv or .jsonl file"),
}


def preflight(tiny_llama, *args: str) -> None:
    main(["--preflight", "--pretrained-model-path", str(tiny_llama), *ARGS, *args])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_file_rejected_in_preflight(case, tiny_llama, tmp_path):
    name, content, flag, needle = BAD[case]
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(UsageError, match=re.escape(needle)):
        preflight(tiny_llama, flag, str(tmp_path / name))


def test_bad_flags_and_short_text_count(tiny, tiny_llama, tmp_path):
    (tmp_path / "s.txt").write_text(SHORT)
    n = len(tiny[1](SHORT, add_special_tokens=False)["input_ids"])
    with pytest.raises(UsageError, match=f"file:{re.escape(str(tmp_path))}/s.txt has {n} tokens, fewer"):
        preflight(tiny_llama, "--eval-text-path", str(tmp_path / "s.txt"))
    with pytest.raises(UsageError, match="not both"):
        preflight(tiny_llama, "--eval-text-path", str(tmp_path / "s.txt"), "--eval-dataset", "x")
    with pytest.raises(UsageError, match="--eval-max-chunks must be >= 1"):
        preflight(tiny_llama, "--eval-max-chunks", "0")
    with pytest.raises(UsageError, match="--seq-length must be >= 2"):
        preflight(tiny_llama, "--seq-length", "1")


def test_error_is_one_line_before_torchrun(tiny_llama, tmp_path):
    """TP=2: the launcher's preflight rejects the short text; torchrun never starts."""
    (tmp_path / "short.txt").write_text(SHORT)
    res = run_script("evaluate.sh", *ARGS, "--eval-text-path", str(tmp_path / "short.txt"),
                     env=clean_env(TP="2", HF_MODEL_CKPT=str(tiny_llama)))
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("error: eval text from file:") and "fewer than one --seq-length" in lines[0]


@pytest.mark.slow
def test_smollm2_perplexity(smollm2_dir, runtime):
    """SmolLM2-135M-Instruct on 4 x 256 tokens of the built-in eval text: measured 16.76."""
    model, tok, _ = setup_model(SourceConfig(), ModelConfig(), runtime)
    cfg = EvalConfig(max_chunks=4)
    res = perplexity(model, eval_windows(load_eval_text(cfg), tok, cfg, 256), micro_batch_size=4)
    print(f"SmolLM2 perplexity {res.perplexity:.4f} (nll {res.nll:.4f}, {res.tokens} tokens)")
    assert math.isfinite(res.perplexity) and 1.0 < res.perplexity < 20.0


def test_mmlu_script_reports_the_accuracy_alone(tp1_run, tiny_llama):
    """scripts/mmlu.sh (Megatron-LM's name): evaluate's MMLU mode on the shipped sample file, no
    perplexity; the last line is the accuracy evaluate.sh reports for the same file."""
    _, report = tp1_run
    res = run_script("mmlu.sh", env=clean_env(HF_MODEL_CKPT=str(tiny_llama)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == f"mmlu accuracy {report['accuracy']:.6f}"
    assert "perplexity" not in res.stdout and str(EXAMPLE) in res.stdout
