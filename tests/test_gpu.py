"""The GPU path (nccl, bf16, TE spec when installed). Skipped without CUDA."""
import json

import pytest
import torch

from dist_utils import clean_env, run_script

pytestmark = pytest.mark.gpu


def test_generate_bf16_on_gpu(tmp_path):
    out = tmp_path / "a.json"
    res = run_script("generate.sh", "--device", "cuda", "--bf16", "--max-new-tokens", "16",
                     "--json-out", str(out), env=clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Paris" in json.loads(out.read_text())[0]["answer"]


@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="SmolLM2 needs TP=3 (9 heads)")
def test_tp3_nccl_matches_tp1(tmp_path):
    answers = []
    for tp in ("1", "3"):
        out = tmp_path / f"tp{tp}.json"
        res = run_script("generate.sh", "--device", "cuda", "--max-new-tokens", "24",
                         "--json-out", str(out), env=clean_env(TP=tp))
        assert res.returncode == 0, res.stderr[-3000:]
        answers.append([r["tokens"] for r in json.loads(out.read_text())])
    assert answers[0] == answers[1]
