"""Acceptance length: the AL definitions on hand-made steps, the prompt formats and their errors,
the measurement on a tiny model (n-gram drafter, and the target as its own drafter: AL = K+1),
Megatron-LM's report_draft_acceptance_length, and acceptance.sh's one-line errors."""
import json

import pytest

from dist_utils import ROOT, clean_env, run_script
from post_training.config import AcceptanceConfig
from post_training.config.speculative import MTBENCH_CATEGORIES
from post_training.speculative.acceptance import (TurnResult, format_report, replay_acceptance,
                                                  summarize)
from post_training.speculative.mtbench import load_mtbench, select_prompts, turn_messages
from post_training.utils import UsageError


# ----------------------------------------------------------------------------- AL math

def test_two_al_definitions_on_hand_made_steps():
    # A: 2 steps, all 3 drafts accepted each time (4 tokens a step). B: 4 steps, the third
    # drafted 2 and kept 1, the last drafted nothing.
    a = TurnResult("a", "math", 1, tokens=8, drafted=[3, 3], accepted=[3, 3])
    b = TurnResult("b", "math", 1, tokens=5, drafted=[3, 3, 2, 0], accepted=[0, 0, 1, 0])
    s = summarize([a, b], draft_steps=3)
    g = s["overall"]
    assert (g["tokens"], g["steps"]) == (13, 6)
    assert g["al"] == pytest.approx(13 / 6)  # ratio of sums (Megatron-LM, SpecForge)
    assert g["al_mean"] == pytest.approx((8 / 2 + 5 / 4) / 2)  # mean of per-prompt ALs (ModelOpt)
    assert g["ar"] == pytest.approx(13 / 6 / 4)
    # position i: accepted >= i / drafted >= i
    assert g["position_rates"] == pytest.approx([3 / 5, 2 / 5, 2 / 4])
    text = format_report(s)
    assert text.splitlines()[-1] == f"average AL {13 / 6:.4f}"
    assert "ratio of sums" in text and "mean of per-prompt" in text


def test_per_prompt_al_joins_a_prompts_two_turns():
    t1 = TurnResult("q", "stem", 1, tokens=4, drafted=[3], accepted=[3])
    t2 = TurnResult("q", "stem", 2, tokens=2, drafted=[3, 3], accepted=[0, 0])
    r = TurnResult("r", "coding", 1, tokens=3, drafted=[1, 1], accepted=[1, 0])
    s = summarize([r, t1, t2], draft_steps=3)
    assert list(s["categories"]) == ["coding", "stem"]  # MT-Bench's order, not arrival order
    assert s["categories"]["stem"]["al_mean"] == pytest.approx(6 / 3)
    assert s["overall"]["al_mean"] == pytest.approx((6 / 3 + 3 / 2) / 2)
    assert s["overall"]["position_rates"][2] == pytest.approx(1 / 3)


class Scripted:
    """Proposes the true continuation of ``answer`` with every ``wrong``-th token changed."""

    def __init__(self, prompt, answer, wrong=None):
        self.n, self.answer, self.wrong, self.calls = len(prompt), answer, wrong, []

    def reset(self, prompt_ids):
        assert len(prompt_ids) == self.n

    def propose(self, context, k):
        pos = len(context) - self.n
        out = self.answer[pos:pos + k]
        if self.wrong is not None:
            out = [t + 1 if (pos + i) % self.wrong == self.wrong - 1 else t for i, t in enumerate(out)]
        self.calls.append(k)
        return out

    def accept(self, n, context):
        pass


def test_replay_counts_matching_drafts_and_stops_at_the_answer():
    prompt, answer = [7, 7], list(range(100, 110))  # 10 tokens
    perfect = Scripted(prompt, answer)
    drafted, accepted = replay_acceptance(perfect, prompt, answer, draft_steps=4)
    # 5 + 5 tokens; the second step drafts 4 (its own token is the 10th)
    assert accepted == [4, 4] and drafted == [4, 4]
    # Every 3rd answer token wrong: positions 2, 5, 8 are rejected
    drafted, accepted = replay_acceptance(Scripted(prompt, answer, wrong=3), prompt, answer, 4)
    assert accepted == [2, 2, 2, 0] and sum(accepted) + len(accepted) == len(answer)
    assert drafted == [4, 4, 3, 0]  # the last steps draft only up to the answer's end


# ----------------------------------------------------------------------------- prompt files

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_builtin_set_covers_mtbench_categories_with_two_turns():
    prompts = load_mtbench("builtin")
    assert {p.category for p in prompts} == set(MTBENCH_CATEGORIES)
    assert all(len(p.turns) == 2 for p in prompts) and len(prompts) == 40
    firsts = select_prompts(prompts, num_prompts=1)
    assert [p.category for p in firsts] == list(MTBENCH_CATEGORIES)


def test_fastchat_hub_rows_and_chat_files_load(tmp_path):
    fastchat = _jsonl(tmp_path / "question.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["w1", "w2"]},
        {"question_id": 111, "category": "math", "turns": ["m1", "m2"], "reference": ["4", "5"]}])
    hub = [{"prompt": ["r1", "r2"], "prompt_id": 3, "category": "roleplay"},
           {"prompt": ["s1"], "prompt_id": 4, "category": "stem"}]
    (tmp_path / "rows.json").write_text(json.dumps(hub))
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]},
        {"conversations": [{"from": "human", "value": "sharegpt"}], "category": "Math"}])
    import datasets

    datasets.Dataset.from_list(hub).to_parquet(str(tmp_path / "rows.parquet"))

    fc = load_mtbench(fastchat)
    assert [(p.id, p.category, p.turns) for p in fc] == [("81", "writing", ("w1", "w2")),
                                                         ("111", "math", ("m1", "m2"))]
    for name in ("rows.json", "rows.parquet"):
        rows = load_mtbench(str(tmp_path / name))
        assert [(p.id, p.category, p.turns) for p in rows] == [("3", "roleplay", ("r1", "r2")),
                                                               ("4", "stem", ("s1",))]
    c, sg = load_mtbench(chat)
    assert c.turns == ("hi", "more") and c.category == "other"
    assert sg.turns == ("sharegpt",) and sg.category == "math"
    assert turn_messages(c, ["A1"]) == [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "A1"},
                                        {"role": "user", "content": "more"}]
    assert [p.id for p in select_prompts(fc, ["math"])] == ["111"]
    with pytest.raises(UsageError, match="no prompts in category stem"):
        select_prompts(fc, ["stem"])
    with pytest.raises(UsageError, match="--turns 2: prompt"):
        select_prompts(load_mtbench(str(tmp_path / "rows.json")), turns=2)


@pytest.mark.parametrize("case", ["bad_json", "no_turns", "no_category", "empty_turn", "missing", "suffix"])
def test_bad_prompt_files_name_the_line(case, tmp_path):
    good = {"question_id": 1, "category": "math", "turns": ["q"]}
    path, needle = tmp_path / "q.jsonl", "line 2"
    if case == "bad_json":
        path.write_text(json.dumps(good) + "\n{\"turns\": [\n")
        needle = "line 2 is not valid JSON"
    elif case == "no_turns":
        _jsonl(path, [good, {"question_id": 2, "category": "math", "text": "q"}])
        needle = "line 2: no 'turns'"
    elif case == "no_category":
        _jsonl(path, [good, {"question_id": 2, "turns": ["q"]}])
        needle = "line 2: missing 'category'"
    elif case == "empty_turn":
        _jsonl(path, [good, {"question_id": 2, "category": "math", "turns": ["q", " "]}])
        needle = "line 2: turns must be"
    elif case == "missing":
        path, needle = tmp_path / "nope.jsonl", "not found"
    else:
        path = tmp_path / "q.csv"
        path.write_text("a,b\n")
        needle = "expected .jsonl, .json or .parquet"
    with pytest.raises(UsageError, match=needle):
        load_mtbench(str(path))


def test_unknown_category_is_a_config_error():
    with pytest.raises(UsageError, match="unknown category poetry"):
        AcceptanceConfig(categories="math,poetry")


# ----------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tiny(tiny_llama, runtime):
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model

    model, tok, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama)), ModelConfig(), runtime)
    return model, tok


def test_target_as_its_own_drafter_gives_k_plus_one(tiny):
    """A drafter proposing the target's own greedy tokens (the target model as the draft
    model) is accepted in full: AL = K+1 exactly when the answer length is a multiple of K+1."""
    from post_training.speculative import ModelDrafter
    from post_training.speculative.acceptance import measure_acceptance

    model, tok = tiny
    k = 3
    prompts = select_prompts(load_mtbench("builtin"), ["coding", "stem"], 1)
    res = measure_acceptance(model, tok, ModelDrafter(model), prompts, osl=12, draft_steps=k,
                             stop_token_ids=[])
    s = summarize(res, k)
    assert s["overall"]["al"] == pytest.approx(k + 1) and s["overall"]["al_mean"] == pytest.approx(k + 1)
    assert s["overall"]["position_rates"] == [1.0] * k and s["overall"]["steps"] == 2 * 3


def test_ngram_replay_matches_speculative_generate(tiny):
    """The replay against the greedy reference counts what lossless speculative decoding with
    the same drafter accepts at each target step."""
    from post_training.config import GenerateConfig
    from post_training.data import render_prompt
    from post_training.speculative import NgramDrafter, speculative_generate

    model, tok = tiny
    (p,) = select_prompts(load_mtbench("builtin"), ["extraction"], 1)
    ids = render_prompt(turn_messages(p, []), tok)
    gcfg = GenerateConfig(max_new_tokens=24)
    tokens, stats = speculative_generate(model, ids, NgramDrafter(2), gcfg, 3)
    _, accepted = replay_acceptance(NgramDrafter(2), ids, list(tokens), 3)
    assert list(stats.accepted) == accepted


def test_cli_end_to_end_and_megatron_report(tiny_llama, tiny, tmp_path, capsys):
    from post_training.cli.acceptance import main
    from post_training.non_loss_data_func import report_draft_acceptance_length
    from post_training.speculative import NgramDrafter

    out = tmp_path / "al.json"
    assert main(["--pretrained-model-path", str(tiny_llama), "--osl", "8", "--num-prompts", "1",
                 "--draft-steps", "2", "--turns", "2", "--json-out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("average AL ")
    al = float(lines[-1].split()[-1])
    summary = json.loads(out.read_text())
    assert list(summary["categories"]) == list(MTBENCH_CATEGORIES)
    assert summary["overall"]["al"] == pytest.approx(al, abs=1e-4) and 1.0 <= al <= 3.0
    assert len(summary["turns"]) == 16 and {t["turn"] for t in summary["turns"]} == {1, 2}
    for c in MTBENCH_CATEGORIES:
        assert any(line.startswith(c) for line in lines)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    model, tok = tiny
    rep = report_draft_acceptance_length([model], tok, NgramDrafter(3), osl=8, draft_steps=3)
    printed = capsys.readouterr().out.strip().splitlines()
    assert list(rep) == [*MTBENCH_CATEGORIES, "average"]
    assert printed[0].startswith("writing AL ") and " AR " in printed[0] and printed[-1].startswith("average AL")
    assert rep["average"]["ar"] == pytest.approx(rep["average"]["al"] / 4)


# ----------------------------------------------------------------------------- scripts

def _one_error_line(res, needle):
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error:"), res.stderr[-2000:]
    assert needle in err[0]


def test_scripts_bad_input_is_one_line(tiny_llama):
    """Each script start costs seconds of imports: two runs, the rest in process below."""
    env = clean_env(HF_MODEL_CKPT=str(tiny_llama))
    res = run_script("acceptance.sh", "--osl", "200", "--seq-length", "256", env=env)
    _one_error_line(res, "+ 1 x --osl 200 exceeds --seq-length 256")
    path = ROOT / "scripts" / "validate.sh"  # Megatron-LM's name runs the same entry
    compile(path.read_text(), str(path), "exec")  # torchrun's interpreter accepts the file
    _one_error_line(run_script("validate.sh", "--categories", "math,poetry", env=env), "unknown category poetry")


@pytest.mark.parametrize("case", ["file", "draft", "eagle", "turns"])
def test_preflight_rejects(case, tiny_llama, tmp_path):
    from post_training.cli.acceptance import main

    args = ["--preflight", "--pretrained-model-path", str(tiny_llama)]
    if case == "file":
        bad = tmp_path / "q.jsonl"
        bad.write_text('{"question_id": 1, "category": "math", "turns": ["q"]}\n{"turns": 3\n')
        args, needle = [*args, "--mtbench-path", str(bad)], "line 2 is not valid JSON"
    elif case == "draft":
        args, needle = [*args, "--draft", "none"], "acceptance needs a drafter"
    elif case == "eagle":
        args, needle = [*args, "--draft", "eagle"], "needs a trained draft head"
    else:  # two turns: both answers count against the sequence length
        args, needle = [*args, "--turns", "2", "--osl", "120", "--seq-length", "300"], "2 x --osl 120"
    with pytest.raises(UsageError, match=needle.replace("+", r"\+")):
        main(args)
    if case == "draft":
        assert main(["--preflight", "--pretrained-model-path", str(tiny_llama), "--categories", "math"]) == 0


@pytest.mark.slow
def test_pp2_acceptance_report_equals_tp1(mr_pp2, tiny):
    """The replay at PP=2 (tokens broadcast from the last stage, the drafter on every rank)
    counts the same tokens and steps as in one process."""
    from post_training.non_loss_data_func import report_draft_acceptance_length
    from post_training.speculative import NgramDrafter

    model, tok = tiny
    ref = report_draft_acceptance_length(model, tok, NgramDrafter(3), osl=8, draft_steps=3)
    got = mr_pp2["acceptance"]
    assert list(got) == list(ref)
    for name, r in ref.items():
        assert (got[name]["tokens"], got[name]["steps"]) == (r["tokens"], r["steps"]), name
