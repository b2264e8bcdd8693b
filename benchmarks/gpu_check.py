"""The GPU path in one process (a lent GPU machine; nothing else there): nccl runtime, the patch
registry as a GPU run applies it, logits / greedy tokens vs transformers on the GPU, the KV cache
(megatron's unrotated key format, the GPU default) chunk and roll-back vs the uncached forward,
bf16, FP8 PTQ through ModelOpt's CUDA path with a checkpoint round trip, and decode throughput of
a SmolLM2-135M-shaped model (random weights: only the shape matters) vs transformers.

    python benchmarks/gpu_check.py --tokenizer DIR [--device cuda] [--json-out F]

DIR holds a tokenizer (tokenizer.json, tokenizer_config.json) and the SmolLM2 config.json; the
tiny models are made here with random weights.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import post_training.cli  # noqa: E402,F401  (quiet import-time notices)


def make_model(out: Path, tok_dir: Path, **shape) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                               architectures=["LlamaForCausalLM"], **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, out / f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from post_training.config import GenerateConfig, ModelConfig, ParallelConfig, QuantizeConfig, SourceConfig
    from post_training.generate import generate
    from post_training.inference import KVCache, stage_forward
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime, patches

    report: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}
    rt = init_runtime(ParallelConfig(device=a.device))
    report["backend"] = rt.backend
    report["patches_applied"] = [p.name for p in patches.registry() if patches.is_applied(p.name)]
    print(json.dumps({k: report[k] for k in ("torch", "device", "backend", "patches_applied")}), flush=True)

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    tok_dir = Path(a.tokenizer)
    tiny = make_model(work / "tiny", tok_dir, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    dev = rt.device
    src = SourceConfig(pretrained_model_path=str(tiny))

    # fp32: logits and greedy tokens equal transformers' on the same device
    model, tok, _ = setup_model(src, ModelConfig(), rt)
    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).to(dev).eval()
    ids = torch.randint(0, 49152, (1, 23), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.inference_mode():
        ours = stage_forward(model, ids, None)
        theirs = ref(ids).logits
    report["fp32_logits_max_diff"] = (ours - theirs).abs().max().item()
    prompt = ids[0, :9].tolist()
    greedy = generate(model, prompt, GenerateConfig(max_new_tokens=24))
    hf = ref.generate(torch.tensor([prompt], device=dev), max_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    report["fp32_greedy_equal"] = greedy == hf

    # KV cache (the device's default key format): a 4-token chunk after a 9-token prefix vs the
    # uncached forward, and truncate-then-continue vs never having appended
    with torch.inference_mode():
        full = stage_forward(model, ids[:, :13], None)
        cache = KVCache(1, 32)
        cache.forward(model, ids[:, :9])
        chunk = cache.forward(model, ids[:, 9:13], all_logits=True)
        cache.truncate(9)
        cache.forward(model, ids[:, 15:17])  # rejected draft
        cache.truncate(9)
        again = cache.forward(model, ids[:, 9:13], all_logits=True)
    report["kv_keys_rotated"] = cache.keys_rotated
    report["kv_chunk_max_diff"] = (chunk - full[:, 9:13]).abs().max().item()
    report["kv_rollback_equal"] = bool(torch.equal(chunk, again))

    # bf16 greedy vs transformers in bf16
    bmodel, _, _ = setup_model(src, ModelConfig(dtype="bf16"), rt)
    bref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).to(dev).eval()
    bg = generate(bmodel, prompt, GenerateConfig(max_new_tokens=24))
    bh = bref.generate(torch.tensor([prompt], device=dev), max_new_tokens=24, do_sample=False,
                       eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    report["bf16_greedy_equal_tokens"] = sum(x == y for x, y in zip(bg, bh))
    print(json.dumps(report), flush=True)

    # FP8 PTQ through ModelOpt on the device, save, reload into a fresh model: same logits
    from post_training.checkpointing import save_checkpoint
    from post_training.quantization.ptq import calibrate_and_quantize

    q = QuantizeConfig(quant_cfg="FP8_DEFAULT_CFG")
    samples = [torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(10 + i)).tolist()
               for i in range(4)]
    qmodel, _, _ = setup_model(src, ModelConfig(), rt)
    t0 = time.perf_counter()
    qmodel = calibrate_and_quantize(qmodel, q, samples)
    report["fp8_quantize_s"] = round(time.perf_counter() - t0, 2)
    save_checkpoint(qmodel, rt, work / "fp8", None, hf_dir=tiny)
    back, _, _ = setup_model(SourceConfig(load=str(work / "fp8")), ModelConfig(), rt)
    with torch.inference_mode():
        qa, qb = stage_forward(qmodel, ids, None), stage_forward(back, ids, None)
    report["fp8_vs_fp32_logits_diff"] = (qa - ours).abs().max().item()
    report["fp8_reload_max_diff"] = (qa - qb).abs().max().item()
    print(json.dumps(report), flush=True)

    # decode throughput, SmolLM2-135M shape (random weights), bf16, 128 tokens after 32
    import json as _json

    shape = _json.loads((tok_dir / "config.json").read_text())
    big = make_model(work / "smol", tok_dir, **{k: shape[k] for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")})
    smodel, _, _ = setup_model(SourceConfig(pretrained_model_path=str(big)), ModelConfig(dtype="bf16"), rt)
    sref = AutoModelForCausalLM.from_pretrained(big, dtype=torch.bfloat16).to(dev).eval()
    p32 = ids[0, :1].repeat(32).tolist()
    n = a.decode_tokens
    for _ in range(2):  # warm-up, then timed
        torch.cuda.synchronize() if a.device == "cuda" else None
        t0 = time.perf_counter()
        generate(smodel, p32, GenerateConfig(max_new_tokens=n))
        torch.cuda.synchronize() if a.device == "cuda" else None
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sref.generate(torch.tensor([p32], device=dev), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize() if a.device == "cuda" else None
        hf_s = time.perf_counter() - t0
    report["decode_tok_s_toolkit"] = round(n / ours_s, 1)
    report["decode_tok_s_transformers"] = round(n / hf_s, 1)
    print(json.dumps(report), flush=True)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
