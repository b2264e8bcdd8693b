"""A save killed with SIGKILL half-way leaves the previous checkpoint loadable and the tracker
pointing at it; the next save clears the debris; keep-last rotation keeps the newest."""
import os
import signal
import subprocess
import time

import pytest
import torch

from dist_utils import PY, ROOT, clean_env
from post_training.io import layout as cio
from workers import ckpt

pytestmark = pytest.mark.slow


def save_cmd(root, iteration, *extra):
    return [PY, str(ROOT / "tests" / "workers" / "ckpt.py"), "save", "--save", str(root),
            "--iteration", str(iteration), *extra]


def test_sigkill_mid_save_keeps_previous(tmp_path, smollm2_dir, runtime):
    root = tmp_path / "run"
    ref = tmp_path / "ref.pt"
    subprocess.run(save_cmd(root, 1, "--out", str(ref)), env=clean_env(), check=True,
                   capture_output=True, timeout=600)
    assert (root / cio.TRACKER).read_text() == "1"

    proc = subprocess.Popen(save_cmd(root, 2), env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    staging = []
    while time.time() < deadline and proc.poll() is None:  # wait until shards are being written
        staging = [p for p in root.iterdir() if p.name.startswith(".iter_0000002.tmp-")]
        if staging and any(f.stat().st_size > 1 << 20 for f in staging[0].glob("*.distcp")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the save finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    assert (root / cio.TRACKER).read_text() == "1"
    assert not (root / "iter_0000002").exists() and staging[0].exists()
    after = ckpt.outputs(ckpt.build(runtime, load=str(root)), runtime)  # verifies sha256 too
    assert torch.equal(after["logits"], torch.load(ref)["logits"])

    subprocess.run(save_cmd(root, 2, "--keep-last", "1"), env=clean_env(), check=True,
                   capture_output=True, timeout=600)
    assert (root / cio.TRACKER).read_text() == "2"
    assert sorted(p.name for p in root.iterdir()) == ["hf_config", "iter_0000002", cio.TRACKER]
