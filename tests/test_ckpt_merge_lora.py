"""``python -m post_training.ckpt merge-lora``: adapters trained with peft for a few steps on random
tokens, merged by the tool, compared with peft's own ``merge_and_unload()``."""
import json
import re
import shutil
import subprocess

import pytest
import torch

from post_training.checkpointing.tools.cli import main
from post_training.utils import UsageError


def merge(*args):
    return main(["merge-lora", *map(str, args)])


def train_adapter(base_dir, out, steps=3, **lora):
    """A LoRA adapter after a few AdamW steps, so lora_B (and trained biases) are non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def peft_merged(base_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).merge_and_unload()


def load(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d)


@pytest.fixture(scope="module")
def bases(tiny_dirs, tmp_path_factory):
    """tiny llama (tied, safetensors), tiny qwen2 (q/k/v biases, untied) as two .bin shards + index,
    a tiny GPT-2 (Conv1D layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("merge_bases")
    qwen_bin = root / "qwen2_bin"
    shutil.copytree(tiny_dirs["qwen2"], qwen_bin)
    (qwen_bin / "model.safetensors").unlink()
    sd = load(tiny_dirs["qwen2"]).state_dict()
    keys, weight_map = list(sd), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, qwen_bin / name)
        weight_map.update(dict.fromkeys(part, name))
    (qwen_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.manual_seed(0)
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(gpt2)
    return {"llama": tiny_dirs["llama"], "qwen2": tiny_dirs["qwen2"], "qwen2_bin": qwen_bin, "gpt2": gpt2}


# case -> (base, LoraConfig kwargs, regex of the base tensors the merge must change, and only those)
CASES = {
    "plain_q_v": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), r"(q|v)_proj\.weight"),
    "rslora_patterns": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                      rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                                      alpha_pattern={"v_proj": 3, "model.layers.2.mlp.down_proj": 32}),
                        r"(q_proj|v_proj|down_proj)\.weight"),
    "bias_lora_only_bin_shards": ("qwen2_bin", dict(r=4, target_modules=["q_proj", "k_proj"], bias="lora_only",
                                                    lora_bias=True), r"(q|k)_proj\.(weight|bias)"),
    "bias_all": ("qwen2", dict(r=4, target_modules=["q_proj"], bias="all"), r"q_proj\.weight|(q|k|v)_proj\.bias"),
    "conv1d_fan_in_fan_out": ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                           bias="lora_only"), r"(c_attn|c_proj)\.(weight|bias)"),
    # peft picks fan_in_fan_out by layer type and saves the last one it set: False here (lm_head is
    # an nn.Linear) though the c_proj are Conv1D (attn.c_proj square); lm_head is tied to wte.
    "conv1d_and_tied_lm_head": ("gpt2", dict(r=4, target_modules=["c_proj", "lm_head"], fan_in_fan_out=True),
                                r"c_proj\.weight|wte\.weight|lm_head\.weight"),
    "modules_to_save": ("qwen2", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        r"q_proj\.weight|lm_head\.weight"),
    "modules_to_save_tied_lm_head": ("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                     r"q_proj\.weight|lm_head\.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(case, bases, tmp_path):
    base_name, lora, changes = CASES[case]
    base = bases[base_name]
    adapter = train_adapter(base, tmp_path / "adapter", **lora)
    out = tmp_path / "merged"
    assert merge(base, adapter, out) == 0

    ref, mine, orig = peft_merged(base, adapter), load(out), load(base)
    ref_sd, mine_sd, orig_sd = ref.state_dict(), mine.state_dict(), orig.state_dict()
    assert mine_sd.keys() == ref_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(mine_sd[k], ref_sd[k], atol=1e-5, rtol=0, msg=k)
    changed = {k for k in orig_sd if not torch.equal(mine_sd[k], orig_sd[k])}
    assert changed and changed == {k for k in orig_sd if re.search(changes, k)}, sorted(changed)
    assert mine.config.tie_word_embeddings == ref.config.tie_word_embeddings
    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)

    # The output keeps the base's sharding and its other files, and lists them all in SHA256SUMS.
    files = {p.name for p in out.iterdir()}
    if base_name == "qwen2_bin":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors"}
    else:
        assert "model.safetensors" in files
    assert {f.name for f in base.iterdir() if not f.name.endswith((".bin", ".safetensors", ".json"))} <= files
    assert {"config.json", "generation_config.json", "SHA256SUMS"} <= files
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_dtype_bf16_is_cast_once(bases, tmp_path):
    adapter = train_adapter(bases["llama"], tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "bf16"
    assert merge(bases["llama"], adapter, out, "--dtype", "bf16") == 0
    from safetensors.torch import load_file

    mine = load_file(out / "model.safetensors")
    ref = peft_merged(bases["llama"], adapter).state_dict()
    for k, t in mine.items():  # fp32 merge, one rounding: exactly peft's fp32 result rounded
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref[k].to(torch.bfloat16)), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def plain_adapter(bases, tmp_path_factory):
    return train_adapter(bases["llama"], tmp_path_factory.mktemp("plain") / "adapter", steps=1, r=4,
                         target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("how", ["quantization_config", "hf_quant_config.json"])
def test_quantized_base_refused(how, bases, plain_adapter, tmp_path):
    base = tmp_path / "quant_base"
    shutil.copytree(bases["llama"], base)
    if how == "quantization_config":
        cfg = json.loads((base / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8"}
        (base / "config.json").write_text(json.dumps(cfg))
    else:
        (base / "hf_quant_config.json").write_text("{}")
    with pytest.raises(UsageError, match="is quantized.*dequantize the base, merge, requantize"):
        merge(base, plain_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapter_for_other_base_refused(bases, plain_adapter, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    small = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(small, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "small_adapter")
    with pytest.raises(UsageError, match=r"model\.layers\.\d\.self_attn\.q_proj\.weight is \[64, 64\] in BASE "
                                         r"but the LoRA update .* is \[32, 32\]"):
        merge(bases["llama"], tmp_path / "small_adapter", tmp_path / "o1")
    gpt2_adapter = tmp_path / "gpt2_adapter"
    get_peft_model(load(bases["gpt2"]), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)) \
        .save_pretrained(gpt2_adapter)
    with pytest.raises(UsageError, match=r"adapter targets transformer\.h\.\d\.attn\.c_attn, which the base has no"):
        merge(bases["llama"], gpt2_adapter, tmp_path / "o2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("o1", "o2", ".o"))]


def test_unsupported_adapters_refused(bases, plain_adapter, tmp_path):
    from peft import LoraConfig, get_peft_model

    dora = tmp_path / "dora"
    get_peft_model(load(bases["llama"]), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    with pytest.raises(UsageError, match="use_dora is set.*DoRA"):
        merge(bases["llama"], dora, tmp_path / "o")
    ia3 = tmp_path / "ia3"
    shutil.copytree(plain_adapter, ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(UsageError, match="is a IA3 adapter; merge-lora merges LoRA adapters only"):
        merge(bases["llama"], ia3, tmp_path / "o")
    with pytest.raises(UsageError, match="no adapter_config.json"):
        merge(bases["llama"], bases["gpt2"], tmp_path / "o")
    dist = tmp_path / "dist_ckpt"
    dist.mkdir()
    (dist / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(UsageError, match="Megatron distributed checkpoint; export it"):
        merge(dist, plain_adapter, tmp_path / "o")


def test_output_not_empty(bases, plain_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="not empty"):
        merge(bases["llama"], plain_adapter, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert merge(bases["llama"], plain_adapter, out, "--overwrite") == 0
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()

