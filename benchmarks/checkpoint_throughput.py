"""Save/load throughput and peak RSS of a SmolLM2-135M checkpoint: the toolkit's dist
checkpoints at several layouts vs plain torch.save and safetensors of the same weights.

    .venv/bin/python benchmarks/checkpoint_throughput.py [--layouts 1x1,3x1,1x2]

Layout TPxPP. SmolLM2 has 9 query / 3 KV heads, so TP is 1 or 3 (TP=2 cannot split it). Each
measurement runs in its own process; "peak RSS" is the largest rank's lifetime peak (the model
is built first in every process, so the numbers compare). Dist saves include what makes them
safe: sha256 of every shard, fsync, atomic rename.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "benchmarks" / "ckpt_worker.py")


def run(method: str, path: Path, tp: int = 1, pp: int = 1) -> dict:
    n = tp * pp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-port", "29533", WORKER] if method.startswith("dist") else [sys.executable, WORKER]
    cmd += [method, "--path", str(path), "--tp", str(tp), "--pp", str(pp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode != 0 or not rows:
        raise SystemExit(f"{method} failed:\n{res.stderr[-3000:]}")
    return {"method": method, "layout": f"TP={tp} PP={pp}", "seconds": max(r["seconds"] for r in rows),
            "bytes": rows[0]["bytes"], "rss_peak_gib": max(r["rss_peak_gib"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="1x1,3x1,1x2")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    rows = []
    try:
        for layout in a.layouts.split(","):
            tp, pp = (int(x) for x in layout.split("x"))
            d = work / f"dist_{tp}x{pp}"
            rows.append(run("dist-save", d, tp, pp))
            rows.append(run("dist-load", d, tp, pp))
        for method, name in (("torch", "model.pt"), ("st", "model.safetensors")):
            rows.append(run(f"{method}-save", work / name))
            rows.append(run(f"{method}-load", work / name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'method':<11} {'layout':<11} {'seconds':>8} {'MB':>7} {'MB/s':>7} {'peak RSS GiB':>13}")
    for r in rows:
        mb = r["bytes"] / 1e6
        print(f"{r['method']:<11} {r['layout']:<11} {r['seconds']:8.2f} {mb:7.0f} {mb / r['seconds']:7.0f} "
              f"{r['rss_peak_gib']:13.2f}")


if __name__ == "__main__":
    main()
