"""The training recipes on the embedded SmolLM2-135M-Instruct, CPU, through the user's scripts:

1. depth pruning 30 -> 15 layers (prune.sh), then the same steps on the same synthesized chats
   with the LM loss only (finetune.sh) vs logits KD from the unpruned model (distill.sh):
   the share of the perplexity gap to the teacher each closes;
2. INT4-AWQ PTQ (quantize.sh) vs QAT (finetune.sh on the PTQ checkpoint) vs QAD (distill.sh on
   the PTQ checkpoint, the unquantized model teaching): the share of the PTQ loss recovered;
3. synthesis throughput (synthesize.sh) at batch 1 vs batched.

Perplexity: evaluate.sh on the built-in evaluation text. One markdown table on stdout (and
--json-out), loss-curve PNGs in --work. Every step is a script a user runs; this file only
chains them and reads their last lines / json reports.

    .venv/bin/python benchmarks/distill_recipes.py --work /tmp/recipes [--steps 40] [--conversations 128]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


CPU_SECONDS: dict[str, float] = {}  # script log name -> CPU seconds its processes used


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(script: str, *args: str, log: Path, env: dict | None = None) -> tuple[str, float]:
    """Run scripts/<script> with TP=PP=1; stdout+stderr to ``log``; returns (stdout, seconds).
    The CPU time of each run is kept too: on a shared machine wall time says little, while CPU
    seconds / 2 is what the run takes alone on the 2 cores it uses."""
    cmd = f"$ {script} {' '.join(args)}"
    if REUSE and log.is_file():
        done = reused(log, cmd)
        if done is not None:
            return done
    e = {k: v for k, v in os.environ.items() if k not in ("TP", "PP", "MLM_MODEL_CKPT",
                                                           "MLM_MODEL_SAVE", "HF_MODEL_CKPT")}
    e.update({"TP": "1", "PP": "1", **(env or {})})
    t0, c0 = time.perf_counter(), children_cpu()
    p = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], cwd=ROOT, env=e,
                       capture_output=True, text=True)
    secs = time.perf_counter() - t0
    CPU_SECONDS[log.stem] = children_cpu() - c0
    log.write_text(f"{cmd}\n{p.stdout}\n--- stderr ---\n{p.stderr}\n--- rc {p.returncode}, "
                   f"wall {secs:.1f} s, cpu {CPU_SECONDS[log.stem]:.1f} s ---\n")
    if p.returncode:
        sys.exit(f"{script} failed ({p.returncode}); see {log}")
    print(f"  {script} {' '.join(args[:3])}... {secs:.0f}s wall, {CPU_SECONDS[log.stem]:.0f}s CPU", flush=True)
    return p.stdout, secs


REUSE = False  # --reuse: a step whose log shows the same command succeeded is read, not re-run


def reused(log: Path, cmd: str) -> tuple[str, float] | None:
    """(stdout, wall s) from an earlier run's log of the same command that succeeded; None when
    it must run. Logs written before the trailer existed (no rc line) count when their command
    matches: the caller still parses their output and fails if it is not there."""
    text = log.read_text()
    head, _, rest = text.partition("\n")
    if head != cmd or "\n--- stderr ---\n" not in rest:
        return None
    stdout = rest.split("\n--- stderr ---\n")[0]
    m = re.search(r"\n--- rc (-?\d+), wall ([0-9.]+) s, cpu ([0-9.]+) s ---\n?$", text)
    if m and m[1] != "0":
        return None
    secs = float(m[2]) if m else float("nan")
    if m:
        CPU_SECONDS[log.stem] = float(m[3])
    print(f"  {cmd[2:60]}... reused from {log.name}" + ("" if m else " (no timing recorded)"), flush=True)
    return stdout, secs


def last_value(stdout: str, key: str) -> float:
    hits = re.findall(rf"^{re.escape(key)} ([-+0-9.einf]+)\s*$", stdout, re.M)
    if not hits:
        raise SystemExit(f"no '{key} <value>' line in the output")
    return float(hits[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--qat-lr", type=float, default=1e-5)
    ap.add_argument("--quant-steps", type=int, default=None, help="QAT / QAD steps (default: --steps)")
    ap.add_argument("--conversations", type=int, default=128)
    ap.add_argument("--synth-batch", type=int, default=16)
    ap.add_argument("--answer-tokens", type=int, default=160)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--all-tokens", action="store_true",
                    help="every training run with --train-on-all-tokens (loss on the user turns too)")
    ap.add_argument("--data", default=None, help="reuse this synthesized jsonl instead of synthesizing")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--parts", default="prune,quant",
                    help="prune (item 1), quant (item 2), synth (item 3: also time synthesis with --data)")
    ap.add_argument("--reuse", action="store_true",
                    help="skip each step whose log in --work shows the same command succeeded")
    ap.add_argument("--ptq-load", default=None,
                    help="item 2: this quantize.sh checkpoint (made with the flags quant_part uses) instead of quantizing")
    ap.add_argument("--ckpt-every", type=int, default=0,
                    help="also save and evaluate every N steps (the perplexity-vs-steps curve)")
    a = ap.parse_args()
    global REUSE
    REUSE = a.reuse
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    from post_training import hf
    from post_training.config import EMBEDDED_MODEL

    teacher = str(hf.conf_hf_dir(hf.load_conf(EMBEDDED_MODEL), None))
    res: dict = {"steps": a.steps, "global_batch": a.gbs, "seq_length": a.seq_length,
                 "tokens_per_run": a.steps * a.gbs * a.seq_length, "lr": a.lr, "qat_lr": a.qat_lr,
                 "loss_on": "all tokens" if a.all_tokens else "assistant tokens"}
    t_start = time.perf_counter()

    # 3. synthesis: batch 1 on a few conversations, then the training set batched; the rates are
    # synthesize.sh's own (generation only, model load excluded)
    def rate(out: str) -> dict:
        m = re.search(r"generated (\d+) sequences, (\d+) tokens in ([0-9.]+) s", out)
        if not m:
            raise SystemExit("synthesize.sh printed no 'generated ...' line")
        seqs, toks, secs = int(m[1]), int(m[2]), float(m[3])
        return {"sequences": seqs, "tokens": toks, "seconds": secs, "seq_per_s": seqs / secs,
                "tok_per_s": toks / secs}

    n1 = max(4, a.synth_batch // 2)
    synth = ["--max-new-tokens", str(a.answer_tokens), "--max-question-tokens", "48"]
    parts = a.parts.split(",")
    data = Path(a.data) if a.data else work / "synth.jsonl"
    if not a.data or "synth" in parts:  # with --data, the synthesized set is only timed
        made = work / "synth.jsonl"
        out1, _ = run("synthesize.sh", "--output", str(work / "synth_b1.jsonl"), "--num-conversations",
                      str(n1), "--synth-batch-size", "1", *synth, log=logs / "synth_b1.log")
        outb, _ = run("synthesize.sh", "--output", str(made), "--num-conversations",
                      str(a.conversations), "--synth-batch-size", str(a.synth_batch), *synth,
                      log=logs / "synth.log")
        res["synthesis"] = {"batch1": rate(out1), "batched": {"batch": a.synth_batch, **rate(outb)}}
    kept = sum(1 for _ in data.open())
    res["data"] = {"file": str(data), "conversations": kept}

    def ppl(tag: str, *src: str) -> float:
        out, _ = run("evaluate.sh", *src, "--seq-length", "512", "--eval-max-chunks",
                     str(a.eval_windows), log=logs / f"eval_{tag}.log")
        value = last_value(out, "perplexity")
        print(f"  perplexity[{tag}] = {value:.3f}", flush=True)
        return value

    def train_args(steps: int) -> list[str]:
        return ["--train-iters", str(steps), "--global-batch-size", str(a.gbs), "--micro-batch-size",
                str(a.mbs), "--seq-length", str(a.seq_length), "--finetune-data-files", str(data),
                "--lr-warmup-iters", str(max(1, steps // 10)), "--eval-interval", "0",
                "--log-interval", "5", "--no-progress", "--finetune",
                *(["--train-on-all-tokens"] if a.all_tokens else [])]

    def fit(tag: str, script: str, load: Path, start: float, lr: float, *extra: str, steps: int = a.steps) -> float:
        """Train ``load`` (perplexity ``start``) with ``script``; the final perplexity. The curve
        kept in res["ppl_curves"][tag] runs from step 0 (``start``) to ``steps``."""
        save = work / tag
        every = ["--save-interval", str(a.ckpt_every)] if 0 < a.ckpt_every < steps else []
        run(script, "--load", str(load), "--save", str(save), "--lr", str(lr), "--min-lr",
            str(lr / 10), "--log-file", str(work / f"{tag}.jsonl"), *train_args(steps), *every,
            *extra, log=logs / f"{tag}.log")
        # intermediate iterations (the loop keeps them all): perplexity vs steps
        curve = [(int(d.name[5:]), ppl(f"{tag}_{d.name[5:]}", "--load", str(d)))
                 for d in sorted(save.glob("iter_*")) if int(d.name[5:]) < steps]
        final = ppl(tag, "--load", str(save))
        res.setdefault("ppl_curves", {})[tag] = [(0, start), *curve, (steps, final)]
        return final

    kd = ["--export-kd-teacher-load", teacher]
    if not {"prune", "quant"} & set(parts):
        return finish(a, res, work, t_start)
    res["ppl_teacher"] = ppl("teacher")
    # 1. depth pruning, LM loss vs logits KD
    if "prune" in parts:
        prune_part(a, res, work, logs, ppl, fit, kd)
    # 2. INT4-AWQ: PTQ vs QAT vs QAD
    if "quant" in parts:
        quant_part(a, res, work, logs, ppl, fit, kd)
    finish(a, res, work, t_start)


def finish(a, res: dict, work: Path, t_start: float) -> None:
    res["minutes"] = round((time.perf_counter() - t_start) / 60, 1)
    res["cpu_seconds"] = {k: round(v, 1) for k, v in CPU_SECONDS.items()}
    res["cpu_minutes_total"] = round(sum(CPU_SECONDS.values()) / 60, 1)
    plot(work, res)
    table(res)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))


def gap_shares(start: float, end: float, target: float) -> tuple[float, float]:
    """Share of the perplexity gap start -> target a run closed by ending at ``end``: linear
    and in log-perplexity."""
    return (start - end) / (start - target), math.log(start / end) / math.log(start / target)


def prune_part(a, res, work, logs, ppl, fit, kd) -> None:
    pruned = work / "pruned"
    run("prune.sh", "--prune-export-config", '{"num_layers": 15}', "--save", str(pruned),
        log=logs / "prune.log")
    res["ppl_pruned"] = ppl("pruned", "--load", str(pruned))
    res["ppl_pruned_lm"] = fit("pruned_lm", "finetune.sh", pruned, res["ppl_pruned"], a.lr)
    res["ppl_pruned_kd"] = fit("pruned_kd", "distill.sh", pruned, res["ppl_pruned"], a.lr, *kd)
    # in log-perplexity (nats per token) too: a pruned model that starts thousands of perplexity
    # points away makes any training close ~all of the linear gap; the log gap still separates
    for tag in ("lm", "kd"):
        res[f"gap_closed_{tag}"], res[f"log_gap_closed_{tag}"] = gap_shares(
            res["ppl_pruned"], res[f"ppl_pruned_{tag}"], res["ppl_teacher"])
    res["remaining_gap_lm_over_kd"] = ((res["ppl_pruned_lm"] - res["ppl_teacher"])
                                       / max(res["ppl_pruned_kd"] - res["ppl_teacher"], 1e-9))


def quant_part(a, res, work, logs, ppl, fit, kd) -> None:
    if a.ptq_load:
        awq = Path(a.ptq_load)
        res["ptq_checkpoint"] = f"reused: {awq}"
    else:
        awq = work / "awq"
        run("quantize.sh", "--export-quant-cfg", "INT4_AWQ_CFG", "--save", str(awq), "--ppl-windows", "0",
            "--calib-dataset", "builtin-chat", "--calib-size", "28", "--calib-seq-length", "256",
            log=logs / "quantize.log")
    res["ppl_awq"] = ppl("awq", "--load", str(awq))
    steps = a.quant_steps or a.steps
    res["quant_steps"] = steps
    res["ppl_qat"] = fit("qat", "finetune.sh", awq, res["ppl_awq"], a.qat_lr, steps=steps)
    res["ppl_qad"] = fit("qad", "distill.sh", awq, res["ppl_awq"], a.qat_lr, *kd, steps=steps)
    for tag in ("qat", "qad"):
        res[f"ptq_loss_recovered_{tag}"], res[f"ptq_log_loss_recovered_{tag}"] = gap_shares(
            res["ppl_awq"], res[f"ppl_{tag}"], res["ppl_teacher"])


def plot(work: Path, res: dict) -> None:
    """Loss curves (training loss per logged iteration) of each pair of runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(pair, title) for pair, title in ((("pruned_lm", "pruned_kd"), "pruned 30->15 layers"),
                                                 (("qat", "qad"), "INT4-AWQ"))
              if any((work / f"{tag}.jsonl").exists() for tag in pair)]  # the parts that ran
    curves = res.get("ppl_curves", {})
    if not panels:
        return
    extra = 1 if any(len(c) > 1 for c in curves.values()) else 0
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(5.5 * (len(panels) + extra), 4),
                             squeeze=False)
    if extra:
        ax = axes[0][-1]
        for tag, pts in curves.items():
            ax.plot(*zip(*pts), marker="o", label=tag)
        ax.axhline(res["ppl_teacher"], color="k", ls="--", lw=1, label="teacher")
        ax.set_yscale("log")
        ax.set_title("eval perplexity vs steps")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    for ax, (pair, title) in zip(axes[0], panels):
        for tag in pair:
            f = work / f"{tag}.jsonl"
            if not f.exists():
                continue
            rows = [json.loads(l) for l in f.open() if l.strip()]
            rows = [r for r in rows if r.get("kind") == "train"]
            for term in ("lm loss", "logits distillation loss"):
                pts = [(r["iteration"], r["losses"][term]) for r in rows if term in r["losses"]]
                if pts:
                    ax.plot(*zip(*pts), label=f"{tag}: {term}")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = work / "distill_recipes_loss.png"
    fig.savefig(out, dpi=100)
    res["plot"] = str(out)


def table(r: dict) -> None:
    print(f"\n{r['steps']} steps x {r['global_batch']} sequences x {r['seq_length']} tokens "
          f"({r['tokens_per_run']} tokens per run), {r['data']['conversations']} chats ({Path(r['data']['file']).name}); "
          f"{r['minutes']} min wall in all, {r['cpu_minutes_total']} CPU-min "
          f"(~{r['cpu_minutes_total'] / 2:.0f} min alone on 2 cores); lr {r.get('lr')} (pruned), "
          f"{r.get('qat_lr')} (QAT / QAD); loss on {r.get('loss_on', 'assistant tokens')}")
    print("| model | perplexity | share of the gap closed (perplexity; log-perplexity) |\n|---|---|---|")
    if "ppl_teacher" in r:
        print(f"| teacher (SmolLM2-135M, 30 layers) | {r['ppl_teacher']:.3f} | |")
    if "ppl_pruned" in r:
        print(f"| pruned to 15 layers | {r['ppl_pruned']:.3f} | 0 |")
        print(f"| + LM loss only | {r['ppl_pruned_lm']:.3f} | {r['gap_closed_lm']:.1%}; {r['log_gap_closed_lm']:.1%} |")
        print(f"| + logits KD | {r['ppl_pruned_kd']:.3f} | {r['gap_closed_kd']:.1%}; {r['log_gap_closed_kd']:.1%} "
              f"({r['gap_closed_kd'] / max(r['gap_closed_lm'], 1e-9):.2f}x LM; log: "
              f"{r['log_gap_closed_kd'] / max(r['log_gap_closed_lm'], 1e-9):.2f}x LM; gap left: LM "
              f"{r['remaining_gap_lm_over_kd']:.2f}x KD's) |")
    if "ppl_awq" in r:
        print(f"| INT4-AWQ PTQ (then {r['quant_steps']} steps each) | {r['ppl_awq']:.3f} | 0 |")
        print(f"| + QAT | {r['ppl_qat']:.3f} | {r['ptq_loss_recovered_qat']:.1%}; {r['ptq_log_loss_recovered_qat']:.1%} |")
        print(f"| + QAD | {r['ppl_qad']:.3f} | {r['ptq_loss_recovered_qad']:.1%}; {r['ptq_log_loss_recovered_qad']:.1%} |")
    for tag, pts in r.get("ppl_curves", {}).items():
        if len(pts) > 1:
            print(f"| {tag}: perplexity at steps | " + ", ".join(f"{i}: {v:.2f}" for i, v in pts) + " | |")
    s = r.get("synthesis")
    if s:
        b1, bb = s["batch1"], s["batched"]
        print(f"| synthesis, batch 1 | {b1['seq_per_s']:.3f} seq/s, {b1['tok_per_s']:.1f} tok/s | |")
        print(f"| synthesis, batch {bb['batch']} | {bb['seq_per_s']:.3f} seq/s, {bb['tok_per_s']:.1f} tok/s "
              f"| {bb['tok_per_s'] / b1['tok_per_s']:.1f}x batch 1 |")


if __name__ == "__main__":
    main()
