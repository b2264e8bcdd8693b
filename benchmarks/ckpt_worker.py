"""One measurement for benchmarks/checkpoint_throughput.py, in its own process (for peak RSS).

Run under torchrun (the toolkit's dist checkpoints) or plain python (torch.save/safetensors).
Prints one JSON line per rank: {"method", "seconds", "bytes", "rss_peak_gib", "rss_before_gib"}.
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


def rss_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["dist-save", "dist-load", "torch-save", "torch-load",
                                       "st-save", "st-load"])
    ap.add_argument("--path", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    a = ap.parse_args()

    import torch

    from post_training.checkpointing import load_model_checkpoint, save_checkpoint
    from post_training.config import SourceConfig
    from post_training.hf import source_hf_dir
    from post_training.model_builder import setup_model
    from post_training.model_builder import build_model
    from post_training.config import ModelConfig
    from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime

    rt = init_runtime(ParallelConfig(tp=a.tp, pp=a.pp, device="cpu"))
    path = Path(a.path)
    src = SourceConfig()
    if a.method == "dist-load":
        from transformers import AutoConfig

        model = build_model(AutoConfig.from_pretrained(source_hf_dir(src)), rt, ModelConfig())
    else:
        model, _, _ = setup_model(src, ModelConfig(), rt)
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    before = rss_peak_gib()
    t0 = time.perf_counter()
    if a.method == "dist-save":
        save_checkpoint(model, rt, path, 1, hf_dir=source_hf_dir(src))
    elif a.method == "dist-load":
        load_model_checkpoint(path, model, rt)
    elif a.method == "torch-save":
        torch.save(sd, path)
        os.sync()
    elif a.method == "torch-load":
        torch.load(path, weights_only=True)
    elif a.method == "st-save":
        from safetensors.torch import save_file

        # tied embedding/output share storage: safetensors refuses shared tensors
        save_file({k: v.contiguous().clone() if "output_layer" in k else v for k, v in sd.items()}, str(path))
        os.sync()
    else:
        from safetensors.torch import load_file

        # load_file maps the file lazily; copy so the bytes are really read, as the others do
        {k: v.clone() for k, v in load_file(str(path)).items()}
    seconds = time.perf_counter() - t0
    size = dir_bytes(path if a.method != "dist-save" else path / "iter_0000001") if path.exists() else 0
    if a.method == "dist-load":
        size = dir_bytes(path / "iter_0000001")
    print(json.dumps({"method": a.method, "tp": a.tp, "pp": a.pp, "seconds": seconds, "bytes": size,
                      "rss_before_gib": before, "rss_peak_gib": rss_peak_gib()}), flush=True)
    destroy_runtime()


if __name__ == "__main__":
    main()
