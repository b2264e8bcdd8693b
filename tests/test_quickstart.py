"""The README's first command as a newcomer runs it: `bash scripts/quickstart.sh` quantizes the
embedded SmolLM2 with the default recipe, its answers stay sensible (the France answer still
names Paris), and the whole output fits in one screen."""
import json
import re

import pytest

from dist_utils import clean_env, run_script

pytestmark = pytest.mark.slow
SCREEN = 60  # lines


def test_quickstart_answers_stay_sensible_and_output_fits_one_screen(tmp_path, smollm2_dir):
    out, save = tmp_path / "quickstart.json", tmp_path / "ckpt"
    # --ppl-windows 2 (of 8) for suite time; the output has the same lines
    res = run_script("quickstart.sh", "--json-out", str(out), "--ppl-windows", "2",
                     env=clean_env(MLM_MODEL_SAVE=str(save)))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    after = [a["after"] for a in report["answers"]]
    print("\n".join(after))
    assert len(after) == 3 and "Paris" in after[0]
    assert report["quant_cfg"] == "FP8_DEFAULT_CFG" and report["calib_dataset"] == "builtin-chat"
    assert 0 < report["perplexity_after"] / report["perplexity_before"] - 1 < 0.05
    assert report["weight_bytes"] < report["weight_bytes_unquantized"]
    # what a person sees: stdout, and stderr without the frames of progress bars (a terminal
    # redraws them in place: ours vanish when done, ModelOpt's weight import leaves 4 lines)
    frames = re.compile(r"\d+%\|.*\|")
    shown = res.stdout.splitlines() + [l for l in res.stderr.splitlines() if l.strip() and not frames.search(l)]
    assert len(shown) + 4 <= SCREEN, "\n".join(shown)
    for text in ("quantizers:", "----- after -----", "| perplexity", "| weights", f"checkpoint: {save}",
                 "bash scripts/export.sh", "[quickstart] done in"):
        assert text in res.stdout, text
    assert re.search(r"fp8 e4m3 per-tensor +weight_quantizer", res.stdout)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (save / "quant_summary.txt").read_text().count("TensorQuantizer") > 100  # the full table
