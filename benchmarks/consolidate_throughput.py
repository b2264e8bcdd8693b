"""``consolidate`` throughput and peak RSS on SmolLM2-135M dist checkpoints, against ``cp -r`` of
the same checkpoint bytes.

    .venv/bin/python benchmarks/consolidate_throughput.py [--layouts 1x1,3x1] [--keep DIR]

Each layout TPxPP is made once with ``scripts/convert.sh`` (SmolLM2 has 9 query / 3 KV heads:
TP 1 or 3). Every measurement is its own child process; its peak RSS comes from
``os.wait4`` (that child alone). "import floor" is a process that only imports what
consolidate imports (torch, torch DCP, safetensors, transformers' Llama): RSS above it is what
consolidating holds. "stream s" is the time consolidate reports for reading and writing tensors (after imports
and metadata); MB/s is bytes written per second of wall time, "stream MB/s" per stream second. Files are in the page cache (just written),
so this measures CPU-side cost, not the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout+stderr) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def max_tensor_bytes(d: Path) -> int:
    """The largest tensor of an HF directory, from the safetensors headers."""
    out = 0
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out = max([out] + [v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                           if k != "__metadata__"])
    return out


def make_checkpoint(save: Path, tp: int, pp: int) -> Path:
    env = {**os.environ, "TP": str(tp), "PP": str(pp), "MLM_MODEL_SAVE": str(save)}
    for k in ("MLM_MODEL_CKPT", "HF_MODEL_CKPT", "MLM_EXTRA_ARGS"):
        env.pop(k, None)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "convert.sh")], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"convert.sh TP={tp} PP={pp} failed:\n{res.stderr[-3000:]}")
    return save / "release"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", default="1x1,3x1")
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one)")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="consolidate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows, largest = [], 0
    try:
        wall, rss, _ = measure([PY, "-c", "import torch, torch.distributed.checkpoint, safetensors; "
                                "import transformers.models.llama.modeling_llama; "
                                "import post_training.ckpt.consolidate_sources"], env)
        rows.append(("import floor", "", wall, None, 0, rss))
        for layout in a.layouts.split(","):
            tp, pp = (int(x) for x in layout.split("x"))
            it = work / f"dist_{layout}" / "release"
            if not it.is_dir():
                make_checkpoint(work / f"dist_{layout}", tp, pp)
            ckpt_bytes = tree_bytes(it)
            copy = work / f"cp_{layout}"
            shutil.rmtree(copy, ignore_errors=True)
            wall, rss, _ = measure(["cp", "-r", str(it), str(copy)])
            rows.append(("cp -r", f"TP={tp} PP={pp}", wall, None, ckpt_bytes, rss))
            shutil.rmtree(copy)
            for dtype in ("keep", "bf16"):
                out = work / f"hf_{layout}_{dtype}"
                wall, rss, log = measure([PY, "-m", "post_training.ckpt", "consolidate", str(it.parent), str(out),
                                          "--dtype", dtype, "--overwrite"], env)
                m = re.search(r"streaming ([\d.]+)s", log)
                written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                if dtype == "keep":
                    largest = max(largest, max_tensor_bytes(out))
                rows.append((f"consolidate {dtype}", f"TP={tp} PP={pp}", wall, float(m.group(1)) if m else None,
                             written, rss))
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{'what':<17} {'source':<10} {'wall s':>7} {'MB':>5} {'MB/s':>6} {'stream s':>9} {'stream MB/s':>12} "
          f"{'peak RSS MiB':>13}")
    for what, src, wall, stream_s, nbytes, rss in rows:
        mb = nbytes / 1e6
        st = ("", "") if stream_s is None else (f"{stream_s:.2f}", f"{mb / max(stream_s, 1e-9):.0f}")
        print(f"{what:<17} {src:<10} {wall:7.2f} {mb:5.0f} {(mb / wall if nbytes else 0):6.0f} {st[0]:>9} "
              f"{st[1]:>12} {rss:13.0f}")
    print(f"largest tensor {largest / 2**20:.0f} MiB; peak RSS above the import floor is what the run "
          "holds: one layer, and the largest tensor twice while it is read (DCP loads a stored chunk, "
          "then copies it into the requested buffer)")


if __name__ == "__main__":
    main()
