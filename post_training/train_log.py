"""What the training loop prints and writes: Megatron-style log lines, the jsonl record, the
progress bar, the loss-curve PNG and the acceptance-length curve of a draft head. No megatron-core here: the loop hands plain numbers."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from post_training.utils import rank


def format_train_line(it: int, total: int, rec: dict[str, Any]) -> str:
    """One line per --log-interval, in Megatron-LM's ``training_log`` shape: each loss term by
    its name (``lm loss: 2.312345E+00 | logits distillation loss: ...``)."""
    parts = [f" iteration {it:>8d}/{total:>8d}",
             f"consumed samples: {rec['consumed_samples']:>12d}",
             f"elapsed time per iteration (ms): {rec['ms_per_iter']:.1f}",
             f"tokens/s: {rec['tokens_per_s']:.0f}",
             f"learning rate: {rec['lr']:.6E}",
             f"global batch size: {rec['global_batch_size']:>5d}"]
    parts += [f"{name}: {value:.6E}" for name, value in rec["losses"].items()]
    if rec.get("grad_norm") is not None:
        parts.append(f"grad norm: {rec['grad_norm']:.3f}")
    if rec.get("skipped"):
        parts.append(f"number of skipped iterations: {rec['skipped']:>3d}")
    if rec.get("memory"):
        parts.append(rec["memory"])
    return " | ".join(parts) + " |"


def format_eval_line(it: int, losses: dict[str, float]) -> str:
    """Megatron-LM's validation line: each term's value and its perplexity."""
    parts = [f"validation loss at iteration {it}"]
    for name, value in losses.items():
        parts.append(f"{name} value: {value:.6E}")
        parts.append(f"{name} PPL: {math.exp(min(value, 20.0)):.6E}")  # capped: exp overflows
    return " | ".join(parts) + " |"


class TrainLog:
    """Collects every record (for the PNG) and writes them to --log-file on rank 0. A resumed run
    keeps the file's records up to its start iteration (later ones belonged to a run past the
    checkpoint) and continues it, so the PNG shows the whole run."""

    def __init__(self, log_file: str | None, start: int = 0) -> None:
        self.records: list[dict[str, Any]] = []
        self.path = Path(log_file) if log_file and rank() == 0 else None
        if self.path is None:
            return
        if start > 0 and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run
                if isinstance(rec, dict) and rec.get("iteration", start + 1) <= start:
                    self.records.append(rec)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_loss_curves(records: list[dict[str, Any]], out: Path) -> Path | None:
    """One PNG: every training term against the iteration, validation terms as markers."""
    if rank() != 0 or not records:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a training node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, style in (("train", "-"), ("valid", "o--")):
        rows = [r for r in records if r["kind"] == kind]
        names = dict.fromkeys(n for r in rows for n in r["losses"])
        for name in names:
            pts = [(r["iteration"], r["losses"][name]) for r in rows
                   if name in r["losses"] and math.isfinite(r["losses"][name])]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{kind} {name}", markersize=4)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_acceptance_curve(records: list[dict[str, Any]], out: Path) -> Path | None:
    """One PNG: the draft head's acceptance length (overall and per category) against the
    training tokens, from the ``acceptance`` records; None when there are none."""
    rows = [r for r in records if r.get("kind") == "acceptance"]
    if rank() != 0 or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [r["consumed_tokens"] for r in rows]
    for cat in dict.fromkeys(c for r in rows for c in r.get("categories", {})):
        pts = [(r["consumed_tokens"], r["categories"][cat]) for r in rows if cat in r.get("categories", {})]
        ax.plot(*zip(*pts), ".-", lw=0.8, alpha=0.45, label=cat)
    ax.plot(x, [r["al"] for r in rows], "o-", color="black", lw=2, label="all (ratio of sums)")
    k = rows[-1].get("draft_steps")
    if k:
        ax.axhline(k + 1, color="grey", ls=":", lw=1, label=f"K+1 = {k + 1}")
    ax.set_xlabel("training tokens (sequence positions fed)")
    ax.set_ylabel("acceptance length (tokens / target step)")
    ax.set_title(f"draft AL during training, K={k}, osl {rows[-1].get('osl')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def progress_bar(enabled: bool, total: int, initial: int):
    """tqdm on rank 0 when asked and stderr is a terminal; None otherwise."""
    if not enabled or rank() != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True, leave=False)
