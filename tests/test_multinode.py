"""Two "nodes" on one machine over loopback (two launcher processes, NNODES=2) give the
same answers as one node with the same TP."""
import json
import subprocess

import pytest

from dist_utils import ROOT, clean_env, free_port, run_script

pytestmark = pytest.mark.slow


def test_two_nodes_equal_one(tiny_llama, tmp_path):
    args = ["--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9"]
    single = tmp_path / "single.json"
    res = run_script("generate.sh", *args, "--json-out", str(single),
                     env=clean_env(TP="2", HF_MODEL_CKPT=str(tiny_llama)))
    assert res.returncode == 0, res.stderr[-3000:]

    multi = tmp_path / "multi.json"
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = clean_env(TP="2", NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, HF_MODEL_CKPT=str(tiny_llama))
        procs.append(subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "generate.sh"), *args, "--json-out", str(multi)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert len(a) == 3
