"""EAGLE-3 on the embedded SmolLM2-135M-Instruct, CPU only, through the user's scripts (issue 15,
"what must be shown"), one table:

1. data: Magpie-style synthesis from seed topics (synthesize.sh --topics-file, batched), written
   once to <work>/synth.jsonl and reused by later runs (or ``--data FILE``);
2. EAGLE-3 head training on it (eagle3.sh, ``--draft-vocab-size 8192``), the draft AL tracked
   every ``--eval-interval`` on the offline prompt set; Medusa on the same data and budget;
3. acceptance (acceptance.sh ``--draft eagle|medusa|ngram --draft-steps 3``) on the offline
   prompt set (post_training/resources/spec_prompts.jsonl, MT-Bench's categories; never trained
   on): AL by both definitions (ratio of sums; ModelOpt's mean of per-prompt ALs), per category;
4. wall-clock speculative generation vs plain greedy (benchmarks/speculative_throughput.py
   ``--draft-head``): tok/s, identical outputs, the measured costs v(K+1)/t1 and d/t1, the
   predicted vs measured speed-up, n-gram beside it;
5. AL against training tokens (from the training jsonl) as a PNG.

Targets, printed pass / fail: AL >= 2.5 by both definitions, EAGLE speed-up >= 1.5x plain
greedy. Every stage is a script a user runs; this file chains them (subprocess) and reads their
json / last lines. CPU seconds per stage (getrusage of the children) say what a run costs
alone on a shared machine: CPU s / 2 on the 2 cores.

    .venv/bin/python benchmarks/eagle_recipe.py --work /tmp/eagle [--data FILE] [--steps 300 --gbs 8 --seq-length 256]
    # plumbing check: --steps 2 --conversations 4 --num-prompts 1 --osl 16 --track-osl 16 ...
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from distill_recipes import CPU_SECONDS, children_cpu, run  # noqa: E402  (the same runner)

AL_TARGET, SPEEDUP_TARGET = 2.5, 1.5


def run_py(script: str, *args: str, log: Path) -> float:
    """A benchmark script in its own process (not a user script): wall seconds; CPU kept too."""
    import subprocess

    t0, c0 = time.perf_counter(), children_cpu()
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                       capture_output=True, text=True)
    CPU_SECONDS[log.stem] = children_cpu() - c0
    log.write_text(f"$ {script} {' '.join(args)}\n{p.stdout}\n--- stderr ---\n{p.stderr}")
    if p.returncode:
        sys.exit(f"{script} failed ({p.returncode}); see {log}")
    secs = time.perf_counter() - t0
    print(f"  {script}... {secs:.0f}s wall, {CPU_SECONDS[log.stem]:.0f}s CPU", flush=True)
    return secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=None, help="reuse this chat jsonl instead of synthesizing")
    ap.add_argument("--topics-file", default=str(ROOT / "examples/data/topics.txt"))
    ap.add_argument("--conversations", type=int, default=256)
    ap.add_argument("--synth-batch", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=192)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=4)
    # 300 x 8 x 256 = 614k tokens: about 7 ms a token under load (RESULTS.md, eagle3.sh 200 x 4 x
    # 256 in 23 min), so ~45 min alone on the 2 cores; the lr that trained there
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--draft-vocab-size", type=int, default=8192)
    ap.add_argument("--eval-interval", type=int, default=0, help="AL tracking interval (default: steps / 6)")
    ap.add_argument("--track-osl", type=int, default=64, help="answer tokens of the AL tracked in training")
    ap.add_argument("--draft-steps", type=int, default=3)
    ap.add_argument("--osl", type=int, default=64, help="acceptance.sh answer tokens")
    ap.add_argument("--num-prompts", type=int, default=None, help="acceptance.sh prompts per category (all)")
    ap.add_argument("--tp-prompts", type=int, default=8, help="throughput: prompts (offline set)")
    ap.add_argument("--tp-osl", type=int, default=128, help="throughput: tokens per answer")
    ap.add_argument("--threads", type=int, default=0, help="throughput: torch threads (0: default)")
    ap.add_argument("--no-medusa", action="store_true")
    ap.add_argument("--random-init", action="store_true",
                    help="ModelOpt's random head init instead of --draft-init-from-target")
    ap.add_argument("--medusa-steps", type=int, default=None, help="Medusa steps (default: --steps)")
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    K = a.draft_steps
    res: dict = {"draft_steps": K, "steps": a.steps, "global_batch": a.gbs, "seq_length": a.seq_length,
                 "draft_vocab_size": a.draft_vocab_size, "osl": a.osl, "stages": {}}
    t_start = time.perf_counter()

    # 1. data, synthesized once
    data = Path(a.data) if a.data else work / "synth.jsonl"
    if not data.is_file():
        out, secs = run("synthesize.sh", "--output", str(data), "--topics-file", a.topics_file,
                        "--num-conversations", str(a.conversations), "--synth-batch-size", str(a.synth_batch),
                        "--max-new-tokens", str(a.answer_tokens), "--max-question-tokens", "48", log=logs / "synth.log")
        m = re.search(r"generated (\d+) sequences, (\d+) tokens in ([0-9.]+) s", out)
        res["stages"]["synthesis"] = {"wall_s": secs, "cpu_s": CPU_SECONDS["synth"],
                                      "tokens_generated": int(m[2]) if m else None}
    else:
        print(f"  data: {data} (cached; delete it to synthesize again)")
    res["data"] = {"file": str(data), "conversations": sum(1 for line in data.open() if line.strip())}

    # 2. heads: EAGLE-3, then Medusa on the same data and budget
    every = a.eval_interval or max(1, a.steps // 6)

    def train(tag: str, *extra: str, steps: int = a.steps) -> dict:
        save = work / tag
        init = [] if a.random_init else ["--draft-init-from-target"]
        out, secs = run("eagle3.sh", "--finetune-data-files", str(data), "--train-iters", str(steps), *init,
                        "--global-batch-size", str(a.gbs), "--micro-batch-size", str(a.mbs),
                        "--seq-length", str(a.seq_length), "--lr", str(a.lr), "--min-lr", str(a.lr / 10),
                        "--lr-warmup-iters", str(max(1, steps // 20)), "--eval-interval", str(every),
                        "--osl", str(a.track_osl), "--draft-steps", str(K), "--log-interval", str(max(1, every // 5)),
                        "--save", str(save), "--log-file", str(work / f"{tag}.jsonl"), "--no-progress", *extra,
                        log=logs / f"{tag}.log")
        recs = [json.loads(line) for line in (work / f"{tag}.jsonl").open() if line.strip()]
        m = re.search(r"(\d+) conversations -> (\d+) train samples of (\d+) tokens \((\d+) conversations, (\d+)% filled",
                      out)
        last = [r for r in recs if r["kind"] == "train"][-1]
        info = {"wall_s": secs, "cpu_s": CPU_SECONDS[tag], "checkpoint": str(save),
                "train_samples": int(m[2]) if m else None, "fill": int(m[5]) / 100 if m else None,
                "steps": steps, "tokens": steps * a.gbs * a.seq_length, "ms_per_iter": last["ms_per_iter"],
                "losses": last["losses"], "al_curve": [(r["consumed_tokens"], r["al"]) for r in recs
                                                       if r["kind"] == "acceptance"]}
        res["stages"][tag] = info
        return info

    train("eagle3", "--draft-vocab-size", str(a.draft_vocab_size))
    heads = {"eagle": work / "eagle3"}
    if not a.no_medusa:
        train("medusa", "--algorithm", "medusa", steps=a.medusa_steps or a.steps)
        heads["medusa"] = work / "medusa"

    # 3. acceptance on the offline prompt set, every drafter
    res["acceptance"] = {}
    for draft in [*heads, "ngram"]:
        jf = work / f"al_{draft}.json"
        extra = ["--load", str(heads[draft])] if draft in heads else []
        if a.num_prompts:
            extra += ["--num-prompts", str(a.num_prompts)]
        run("acceptance.sh", *extra, "--draft", draft, "--draft-steps", str(K), "--osl", str(a.osl),
            "--json-out", str(jf), log=logs / f"al_{draft}.log")
        s = json.loads(jf.read_text())
        res["acceptance"][draft] = {"overall": {k: s["overall"][k] for k in ("al", "al_mean", "tokens", "steps")},
                                    "categories": {c: {"al": g["al"], "al_mean": g["al_mean"]}
                                                   for c, g in s["categories"].items()},
                                    "prompts": s["overall"]["prompts"], "cpu_s": CPU_SECONDS[f"al_{draft}"]}

    # 4. wall-clock throughput: plain greedy vs the heads vs n-gram, identical outputs checked
    tj = work / "throughput.json"
    targs = ["--prompt-set", "offline", "--num-prompts", str(a.tp_prompts), "--osl", str(a.tp_osl),
             "--draft-steps", str(K), "--skip", "model,hf", "--json-out", str(tj)]
    for path in heads.values():
        targs += ["--draft-head", str(path)]
    if a.threads:
        targs += ["--threads", str(a.threads)]
    run_py("speculative_throughput.py", *targs, log=logs / "throughput.log")
    res["throughput"] = json.loads(tj.read_text())
    res["throughput"]["cpu_s"] = CPU_SECONDS["throughput"]

    # 5. AL vs training tokens
    res["al_curve_png"] = str(plot_curves(work, res))
    res["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    res["cpu_seconds"] = {k: round(v, 1) for k, v in CPU_SECONDS.items()}
    table(res)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))


def plot_curves(work: Path, res: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tag in ("eagle3", "medusa"):
        pts = res["stages"].get(tag, {}).get("al_curve")
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{tag} (first prompt of each category)")
    ax.axhline(AL_TARGET, color="grey", ls=":", label=f"target {AL_TARGET}")
    ax.set_xlabel("training tokens (sequence positions fed)")
    ax.set_ylabel(f"AL, K={res['draft_steps']} (tokens / target steps)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = work / "al_vs_training_tokens.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _mark(ok: bool) -> str:
    return "**pass**" if ok else "**fail**"


def table(r: dict) -> None:
    st, acc, tp = r["stages"], r["acceptance"], r["throughput"]
    e = st["eagle3"]
    cpu = lambda key: f"{r['cpu_seconds'].get(key, 0):.0f}"  # noqa: E731
    print(f"\nSmolLM2-135M-Instruct, CPU; {r['data']['conversations']} conversations "
          f"({Path(r['data']['file']).name}); {r['steps']} steps x {r['global_batch']} x {r['seq_length']} "
          f"= {e['tokens']} training tokens per head ({e['train_samples']} packed samples, "
          f"{(e['fill'] or 0):.0%} filled); K={r['draft_steps']}; {r['minutes']} min wall, "
          f"{sum(r['cpu_seconds'].values()) / 60:.1f} CPU-min (~{sum(r['cpu_seconds'].values()) / 120:.0f} min "
          f"alone on 2 cores)")
    heads = [h for h in ("eagle", "medusa") if h in acc]
    cols = heads + ["ngram"]
    title = {"eagle": "EAGLE-3 head", "medusa": "Medusa heads", "ngram": "n-gram"}
    print("| | " + " | ".join(title[c] for c in cols) + " | target | CPU s |\n|---|" + "---|" * (len(cols) + 2))
    syn = st.get("synthesis")
    if syn:
        print(f"| data synthesis (batched) | {r['data']['conversations']} conversations, "
              f"{syn['tokens_generated']} tokens |" + " |" * (len(cols) - 1) + f" | {cpu('synth')} |")
    for tag, col in (("eagle3", "eagle"), ("medusa", "medusa")):
        if tag in st:
            s = st[tag]
            cells = [f"{s['steps']} steps, {s['ms_per_iter'] / 1000:.1f} s/step, final "
                     + ", ".join(f"{k} {v:.3f}" for k, v in s["losses"].items() if "ttt-0" in k or "head-0" in k)
                     if c == col else "" for c in cols]
            print(f"| {tag} training | " + " | ".join(cells) + f" | | {cpu(tag)} |")
    for key, name in (("al", "AL, ratio of sums"), ("al_mean", "AL, mean of per-prompt ALs")):
        vals = [acc[c]["overall"][key] for c in cols]
        print(f"| {name} ({acc[cols[0]]['prompts']} prompts, osl {r['osl']}) | " + " | ".join(f"{v:.3f}" for v in vals)
              + f" | >= {AL_TARGET}: eagle {_mark(acc['eagle']['overall'][key] >= AL_TARGET)} | |")
    for cat in acc["eagle"]["categories"]:
        print(f"| &nbsp; {cat} (AL; AL mean) | " + " | ".join(
            f"{acc[c]['categories'][cat]['al']:.2f}; {acc[c]['categories'][cat]['al_mean']:.2f}" for c in cols) + " | | |")
    print(f"| acceptance.sh CPU s | " + " | ".join(cpu(f"al_{c}") for c in cols) + " | | |")
    m = tp["methods"]
    names = {"eagle": "eagle", "medusa": "medusa", "ngram": "n-gram"}

    def row(label: str, f, target: str = "", cost: str = "") -> None:
        print(f"| {label} | " + " | ".join(f(m[names[c]]) if names[c] in m else "" for c in cols)
              + f" | {target} | {cost} |")

    plain = m["plain greedy"]
    print(f"| plain greedy ({tp['prompts']} prompts x {tp['osl']} tokens, t1 {tp['t1_ms']:.1f} ms) | "
          + " | ".join([f"{plain['tok_s']:.1f} tok/s"] + [""] * (len(cols) - 1)) + f" | | {cpu('throughput')} |")
    row("speculative tok/s", lambda x: f"{x['tok_s']:.1f}")
    ok = m.get("eagle", {}).get("vs_plain", 0) >= SPEEDUP_TARGET
    row("measured speed-up vs plain greedy", lambda x: f"{x['vs_plain']:.2f}x",
        f">= {SPEEDUP_TARGET}x: eagle {_mark(ok)}")
    row("predicted speed-up (costs x AL)", lambda x: f"{x['predicted']:.2f}x")
    vk = tp["v_over_t1"][str(tp["draft_steps"] + 1)]
    row(f"draft step d/t1 (verify v(K+1)/t1 = {vk:.2f})", lambda x: f"{x['d_over_t1']:.2f}")
    row("AL in the timed runs", lambda x: f"{x['al']:.2f}")
    row("outputs identical to plain greedy", lambda x: str(x["identical"]))
    print(f"\nAL definitions: ratio of sums = generated tokens / target steps over all prompts "
          f"(Megatron-LM, SpecForge); mean = ModelOpt ar_validate's mean of per-prompt ALs.")
    print(f"AL vs training tokens: {r['al_curve_png']}")


if __name__ == "__main__":
    main()
