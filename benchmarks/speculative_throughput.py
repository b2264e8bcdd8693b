"""Speculative generation throughput on CPU: plain greedy vs n-gram (prompt lookup) vs a draft
model vs trained draft heads (EAGLE / Medusa), and transformers' own prompt-lookup generation,
on the same prompts, in one process.

    .venv/bin/python benchmarks/speculative_throughput.py [--num-prompts 6] [--osl 128]
        [--draft-steps 3] [--ngram-size 3] [--draft-layers 0-9] [--draft-model-path DIR]
        [--draft-head CKPT_OR_DIR ...] [--json-out FILE]

``--draft-head`` (repeatable) adds a row per trained head: a checkpoint of scripts/eagle3.sh
(its ModelOpt head, as ``--draft eagle`` with ``--load``) or an exported head directory
(``<EXPORT_DIR>/eagle3_draft``), named by its kind (eagle / medusa); its draft cost d is its
measured proposal time per drafted token.

Target: the default SmolLM2-135M-Instruct, fp32, one process. Prompts (chat template applied):
the project's offline MT-Bench-style set (``--prompt-set offline``, the default:
post_training/resources/spec_prompts.jsonl, first turns, taken one category at a time so the
first 8 cover all eight categories), the first N of post_training/resources/chat_questions.txt
(``--prompt-set chat``) or of four
built-in input-grounded requests (``grounded``: fix typos, add a docstring, renumber a list,
repeat a sentence), where answers copy their prompt as prompt lookup expects. Each answer runs to --osl
tokens (EOS ignored, so every method produces the same number of tokens; --stop-at-eos keeps
EOS). The draft model defaults to a depth-truncated copy of SmolLM2 (the layers named by
--draft-layers, with its final norm and head), built once with transformers. Every
speculative output is checked token for token against plain greedy. Truncated SmolLM2 copies are
poor drafts (first 10 layers: 15% teacher-forced agreement with the full model; benchmarks/
RESULTS.md): the draft-model row shows the path works and what a draft step costs, not a
speed-up. On a loaded machine run with OMP_NUM_THREADS=1 --threads 1; methods alternate per
prompt.

Cost model (printed beside the measurement): with t1 the time of one plain decode step,
v(k) of one verify forward of k tokens (all logits) and d of one draft-model decode step, all
measured at a context of about prompt + osl/2 tokens, the predicted speed-up is

    tokens * t1 / sum over target steps i of (v(drafted_i + 1) + drafted_i * d)

(n-gram: d = its measured proposal time; a step with nothing drafted costs v(1) = t1). With
every step drafting K tokens this is AL / (v(K+1)/t1 + K*d/t1).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


# Input-grounded requests (edit / extract / rewrite a given text), where an answer copies spans
# of its prompt: prompt lookup's use case. The chat questions ask for new text instead.
GROUNDED = [
    "Fix the spelling mistakes in this paragraph and return the corrected paragraph:\n\n"
    "The quick brown fox jumpd over the lazy dog. The dog was not amused and barkd loudly at the "
    "fox, who ran into the forrest. Later that day the fox came back and apologised to the dog, "
    "and the two of them became freinds. They spent the evening siting by the river together.",
    "Add a docstring to this Python function and return the whole function:\n\n"
    "def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must "
    "be positive')\n    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n"
    "        if i >= window:\n            total -= values[i - window]\n        if i >= window - 1:\n"
    "            out.append(total / window)\n    return out",
    "Convert this list into a numbered list, keeping every item as written:\n\n- buy milk and eggs\n"
    "- call the plumber about the kitchen sink\n- return the library books before Friday\n- water the "
    "tomato plants in the garden\n- book train tickets for the trip to the coast\n- send the birthday "
    "card to grandmother",
    "Repeat the following sentence three times, each on its own line: Speculative decoding lets a "
    "small draft propose tokens that the large model verifies in one forward pass.",
]


def offline_first_turns() -> list[str]:
    """First turns of the offline prompt set, interleaved by category (one of each, then again)."""
    from post_training.speculative.mtbench import load_mtbench

    by_cat: dict[str, list[str]] = {}
    for q in load_mtbench("builtin"):
        by_cat.setdefault(q.category, []).append(q.turns[0])
    rows = list(by_cat.values())
    return [r[i] for i in range(max(map(len, rows))) for r in rows if i < len(r)]


def truncated_draft(src: Path, layers: str, out_root: Path) -> Path:
    """An HF copy of ``src`` keeping the decoder layers ``layers`` ("0-5,27-29"), built once."""
    import torch
    from transformers import AutoModelForCausalLM

    keep = []
    for part in layers.split(","):
        lo, _, hi = part.partition("-")
        keep += list(range(int(lo), int(hi or lo) + 1))
    out = out_root / f"{src.name}-layers-{layers.replace(',', '_')}"
    if (out / "config.json").is_file():
        return out
    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in keep])
    for i, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = i
    m.config.num_hidden_layers = len(keep)
    if hasattr(m.config, "layer_types") and m.config.layer_types:
        m.config.layer_types = [m.config.layer_types[i] for i in keep]
    tmp = out.with_name(out.name + ".tmp")
    m.save_pretrained(tmp)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--prompt-set", choices=("offline", "chat", "grounded"), default="offline",
                    help="offline: spec_prompts.jsonl (MT-Bench's categories, first turns); "
                         "chat: chat_questions.txt; grounded: built-in edit / extract requests")
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--draft-steps", type=int, default=3)
    ap.add_argument("--ngram-size", type=int, default=3)
    ap.add_argument("--draft-layers", default="0-9")
    ap.add_argument("--draft-model-path", default=None)
    ap.add_argument("--stop-at-eos", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out (model, hf)")
    ap.add_argument("--cost-reps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--draft-head", action="append", default=[],
                    help="trained head: scripts/eagle3.sh checkpoint or exported head dir (repeatable)")
    ap.add_argument("--json-out", default=None, help="every row and the measured costs as json")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from post_training import hf as hf_mod
    from post_training.config import GenerateConfig, ModelConfig, SourceConfig
    from post_training.data import render_prompt
    from post_training.generate import generate, stop_token_ids
    from post_training.inference import KVCache
    from post_training.model_builder import setup_model
    from post_training.runtime import ParallelConfig, cpu_compat, init_runtime
    from post_training.speculative import ModelDrafter, NgramDrafter, speculative_generate

    rt = init_runtime(ParallelConfig())
    model, tok, hf_config = setup_model(SourceConfig(), ModelConfig(), rt)
    hf_dir = Path(tok.name_or_path)
    K = a.draft_steps
    questions = (Path(__file__).resolve().parents[1] / "post_training/resources/chat_questions.txt").read_text().splitlines()
    if a.prompt_set == "grounded":
        questions = GROUNDED
    elif a.prompt_set == "offline":
        questions = offline_first_turns()
    prompts = [render_prompt(q, tok) for q in questions if q.strip()][: a.num_prompts]
    stops = stop_token_ids(tok, hf_config) if a.stop_at_eos else []
    g = GenerateConfig(max_new_tokens=a.osl, stop_token_ids=stops)
    skip = set(filter(None, a.skip.split(",")))

    drafters = {"ngram": NgramDrafter(a.ngram_size)}
    if "model" not in skip:
        ddir = Path(a.draft_model_path) if a.draft_model_path else truncated_draft(hf_dir, a.draft_layers, hf_mod.cache_dir())
        dmodel, _, _ = setup_model(SourceConfig(pretrained_model_path=str(ddir)), ModelConfig(), rt, hf_dir=ddir)
        drafters["model"] = ModelDrafter(dmodel)
        print(f"draft model: {ddir.name} ({dmodel.config.num_layers} layers)")

    for path in a.draft_head:
        name = head_row(path, model, rt, drafters)
        print(f"draft head: {name} from {path}")

    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval() if "hf" not in skip else None
    if ref is not None and not a.stop_at_eos:
        ref.generation_config.eos_token_id = None  # run to --osl like the toolkit's runs

    # One prompt at a time, every method in turn (round robin): load changes on a shared
    # machine then hit every method alike instead of whichever ran during a busy minute.
    def run_plain(p):
        return generate(model, p, g), None

    def run_spec(name, p):
        return speculative_generate(model, p, drafters[name], g, K)

    def run_hf(lookup, p):
        kw = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
        with torch.inference_mode(), cpu_compat.device_mode_suspended():
            o = ref.generate(torch.tensor([p]), max_new_tokens=a.osl, do_sample=False, pad_token_id=0, **kw)
        return o[0, len(p):].tolist(), None

    methods = {"plain greedy": run_plain, "n-gram": lambda p: run_spec("ngram", p)}
    if "model" in drafters:
        methods["draft model"] = lambda p: run_spec("model", p)
    for name in drafters:
        if name not in ("ngram", "model"):
            methods[name] = lambda p, n=name: run_spec(n, p)
    if ref is not None:
        methods["hf greedy"] = lambda p: run_hf(None, p)
        methods["hf prompt lookup"] = lambda p: run_hf(K, p)
    generate(model, prompts[0], GenerateConfig(max_new_tokens=8))  # warm-up
    results = {name: [0.0, [], []] for name in methods}
    for i, p in enumerate(prompts):
        for name, fn in methods.items():
            t = time.perf_counter()
            out, st = fn(p)
            results[name][0] += time.perf_counter() - t
            results[name][1].append(out)
            if st is not None:
                results[name][2].append(st)
        print(f"  prompt {i + 1}/{len(prompts)} done", flush=True)

    # Per-forward costs at a mid-answer context: the k-token appends (rolled back) alternate
    # within each repetition, medians over the repetitions.
    ctx = prompts[0] + results["plain greedy"][1][0][: a.osl // 2]
    models = {"target": model, **({"draft": drafters["model"].model} if "model" in drafters else {})}
    caches = {n: KVCache(1, len(ctx) + K + 2) for n in models}
    times: dict = {}
    with torch.inference_mode(), cpu_compat.device_mode_suspended():
        for n, m in models.items():
            caches[n].forward(m, torch.tensor([ctx]))
        for _ in range(a.cost_reps):
            for n, k in [("target", k) for k in range(1, K + 2)] + [("draft", 1)] * ("draft" in models):
                x = torch.tensor([ctx[-k:]])
                t = time.perf_counter()
                caches[n].forward(models[n], x, all_logits=k > 1)
                times.setdefault((n, k), []).append(time.perf_counter() - t)
                caches[n].truncate(len(ctx))
    med = {key: statistics.median(val) for key, val in times.items()}
    t1 = med[("target", 1)]
    v = {k: med[("target", k)] for k in range(1, K + 2)}
    d_model = med.get(("draft", 1), 0.0)

    total = sum(len(o) for o in results["plain greedy"][1])
    base_tps = total / results["plain greedy"][0]
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; SmolLM2-135M-Instruct fp32, CPU, "
          f"threads {torch.get_num_threads()}; {len(prompts)} prompts ({a.prompt_set}), "
          f"osl {a.osl}{'' if a.stop_at_eos else ' (EOS ignored)'}, {total} tokens; K={K}, n-gram n={a.ngram_size}")
    print(f"costs relative to one decode step (t1 = {t1 * 1e3:.1f} ms): verify v(k)/t1 "
          + ", ".join(f"k={k}: {v[k] / t1:.2f}" for k in range(2, K + 2))
          + (f"; draft-model step d/t1 = {d_model / t1:.2f}" if "model" in drafters else ""))
    if "model" in drafters:  # where a draft model starts to pay: AL above its per-step cost
        be = v[K + 1] / t1 + K * d_model / t1
        print(f"draft model break-even: AL {be:.2f} at K={K} (v(K+1)/t1 + K*d/t1); the ideal AL "
              f"K+1 = {K + 1} would give {(K + 1) / be:.2f}x")
    print(f"{'method':<18}{'tok/s':>8}{'vs plain':>10}{'AL':>7}{'steps':>7}{'d/t1':>7}{'predicted':>11}  identical")
    rows = {}
    for name, (sec, outs, stats) in results.items():
        stats = stats or None
        tps = sum(len(o) for o in outs) / sec
        same = outs == results["plain greedy"][1]
        row = rows[name] = {"tok_s": tps, "vs_plain": tps / base_tps, "identical": same}
        al = steps = pred = dt1 = ""
        if stats:
            n_steps = sum(s.steps for s in stats)
            toks = sum(s.tokens for s in stats)
            d = d_model if name == "draft model" else sum(s.draft_seconds for s in stats) / max(
                1, sum(x for s in stats for x in s.drafted))
            cost = sum(v[dr + 1] + dr * d for s in stats for dr in s.drafted)
            row.update(al=toks / n_steps, steps=n_steps, d_over_t1=d / t1, predicted=toks * t1 / cost)
            al, steps, pred, dt1 = f"{toks / n_steps:.2f}", str(n_steps), f"{toks * t1 / cost:.2f}x", f"{d / t1:.2f}"
        print(f"{name:<18}{tps:8.1f}{tps / base_tps:9.2f}x{al:>7}{steps:>7}{dt1:>7}{pred:>11}  {same}")
    if a.json_out:
        import json

        Path(a.json_out).write_text(json.dumps({
            "prompts": len(prompts), "prompt_set": a.prompt_set, "osl": a.osl, "draft_steps": K,
            "tokens": total, "t1_ms": t1 * 1e3, "v_over_t1": {k: v[k] / t1 for k in v},
            "threads": torch.get_num_threads(), "methods": rows}, indent=1))


def head_row(path: str, target, rt, drafters: dict) -> str:
    """Add the drafter of a trained head (checkpoint or exported dir) to ``drafters``; its name."""
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model
    from post_training.speculative.eagle_draft import MedusaDraft, load_draft_head
    from post_training.speculative.head_drafter import head_drafter, head_of_target

    if (Path(path) / "model.safetensors").is_file():
        head = load_draft_head(path)
    else:  # the checkpoint's target is the same frozen model: only its head is kept
        holder, _, _ = setup_model(SourceConfig(load=path), ModelConfig(), rt)
        head = head_of_target(holder)
        del holder
    name = "medusa" if isinstance(head, MedusaDraft) else "eagle"
    while name in drafters:
        name += "'"
    drafters[name] = head_drafter(head, target)
    return name


if __name__ == "__main__":
    main()
