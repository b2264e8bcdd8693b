"""Launch real ranks for tests: torchrun over gloo, or the toolkit's own scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from post_training.utils import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TP", "PP", "DP", "HF_MODEL_CKPT", "MLM_MODEL_CKPT", "MLM_MODEL_SAVE",
                        "MLM_EXTRA_ARGS", "EXPORT_DIR", "NNODES", "NODE_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    env["MASTER_PORT"] = str(free_port())
    env.update(extra)
    return env


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/workers/<script> on ``nproc`` gloo ranks; raises with the output on failure."""
    env = clean_env()
    cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", env["MASTER_PORT"], str(ROOT / "tests" / "workers" / script), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
