"""Draft-head training (post_training/speculative/heads.py, head_state.py, cli/eagle3.py) on the
tiny llama: each TE stand-in of runtime/te_standins.py does what the plugin needs, EAGLE-3 /
EAGLE-1 / Medusa training lowers the draft loss while the target stays bit-identical with no
gradient and no optimizer state, the plugin's forward is what head_state's docstring says (a
reference written from the docstring reproduces its logits and loss), a checkpoint resumes
exactly and re-creates the head on --load, TP=2 reproduces TP=1, bad input is one line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from post_training.config import DraftTrainConfig
from post_training.runtime import patches
from post_training.speculative import heads
from post_training.utils import UsageError
from workers import draft_heads, loop

EAGLE3_NAMES = {"fc.weight", "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight",
                *(f"midlayer.self_attn.{x}_proj.weight" for x in "qkvo"),
                "midlayer.post_attention_layernorm.weight",
                *(f"midlayer.mlp.{x}_proj.weight" for x in ("gate", "up", "down")),
                "norm.weight", "lm_head.weight", "d2t"}


@pytest.fixture(scope="module")
def standins(runtime):
    from post_training.runtime.te_standins import apply_standins

    apply_standins()
    return runtime


# ----------------------------------------------------------------------------- TE stand-ins


def _tcfg(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                use_cpu_initialization=True, init_method_std=0.02, attention_dropout=0.0)
    return TransformerConfig(**{**base, **kw})


def test_norm_and_linear_standins(standins):
    from megatron.core.post_training.modelopt.gpt import model_specs
    from modelopt.torch.speculative.plugins import megatron_eagle as me

    assert patches.is_applied("te_norm_standin") and patches.is_applied("te_linear_standin")
    norm = me.TENorm(_tcfg(), 8, 1e-5)
    assert type(model_specs.Norm(_tcfg(), 8, 1e-5)) is type(norm)
    x = torch.randn(3, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    fc = me.TELinear(8, 4, parallel_mode="duplicated", config=_tcfg(), init_method=lambda w: None,
                     bias=False, skip_bias_add=False, skip_weight_param_allocation=False)
    out, bias = fc(x)
    assert bias is None and fc.weight.abs().sum() > 0  # initialized (the plugin's init is a no-op)
    torch.testing.assert_close(out, x @ fc.weight.T)
    with pytest.raises(ValueError, match="duplicated"):
        me.TELinear(8, 4, parallel_mode="row", config=_tcfg(), init_method=None, bias=False,
                    skip_bias_add=False, skip_weight_param_allocation=False)


def test_attention_standin_honours_the_mask_and_survives_cache_writes(standins):
    """The draft layer's core attention: an arbitrary boolean mask is the whole mask, and a later
    in-place write into the key/value cache does not break backward (plain SDPA fails)."""
    from megatron.core.post_training.modelopt.gpt import model_specs
    from megatron.core.transformer.enums import AttnMaskType

    from post_training.attention import SDPAttention

    cfg = _tcfg(num_attention_heads=2, kv_channels=4)
    sq, sk = 3, 6
    mask = torch.rand(1, 1, sq, sk) > 0.5
    mask[..., 0] = False  # every query sees something
    for cls, ok in ((model_specs.TEDotProductAttention, True), (SDPAttention, False)):
        attn = cls(cfg, 1, AttnMaskType.arbitrary, "self")
        cache = torch.randn(sk, 1, 2, 4)
        k = v = cache[:sk]  # a view of the cache, as megatron's static KV cache returns
        q = torch.randn(sq, 1, 2, 4, requires_grad=True)
        w = torch.randn(sk, 1, 2, 4, requires_grad=True)
        out = attn(q, k + w, v, mask)  # keys depend on a parameter; values are the cache view
        scores = torch.einsum("qbhd,kbhd->bhqk", q, k + w) / 2.0
        ref = torch.einsum("bhqk,kbhd->qbhd", scores.masked_fill(mask, float("-inf")).softmax(-1), v)
        torch.testing.assert_close(out, ref.reshape(sq, 1, 8))
        cache.add_(1.0)  # the next TTT step writes into the cache
        if ok:
            out.sum().backward()
        else:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()


def test_te_version_without_te(standins):
    from megatron.core.transformer import attention

    assert attention.is_te_min_version("2.2.0") is False
    with pytest.raises(TypeError):  # what the EAGLE training forward hit without TE
        patches.upstream("megatron.core.transformer.attention:is_te_min_version")("2.2.0")


# ----------------------------------------------------------------------------- draft vocabulary


def test_calibrate_d2t():
    c = torch.tensor([5, 0, 9, 9, 1, 7])
    d2t = heads.calibrate_d2t(c, 3)
    assert (torch.arange(3) + d2t).tolist() == [2, 3, 5]  # most frequent, kept in id order
    assert (torch.arange(4) + heads.calibrate_d2t(c, 4)).tolist() == [0, 2, 3, 5]
    assert heads.d2t_coverage(c, d2t) == pytest.approx(25 / 31)
    with pytest.raises(UsageError):
        heads.calibrate_d2t(c, 7)


def test_eagle_architecture_from_the_target(tmp_path):
    """The draft layer is sized like a target layer (ModelOpt's megatron default is Llama-3-8B's),
    aux ids listed in the order the plugin concatenates them, --eagle-config overrides last."""
    target = {"num_hidden_layers": 30, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
              "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000}
    over = tmp_path / "e.json"
    over.write_text(json.dumps({"use_last_layernorm": False}))
    cfg = DraftTrainConfig(eagle_aux_layers="26,1,14,1", draft_vocab_size=8192, eagle_config=str(over))
    arch = heads.eagle_architecture(cfg, target, torch.bfloat16)
    assert (arch["intermediate_size"], arch["num_attention_heads"], arch["num_key_value_heads"],
            arch["head_dim"]) == (1536, 9, 3, 64)
    assert arch["rope_theta"] == 100000 and arch["torch_dtype"] == "bfloat16"
    assert arch["eagle_aux_hidden_state_layer_ids"] == [1, 14, 26] and arch["draft_vocab_size"] == 8192
    assert arch["use_aux_hidden_state"] is True and arch["use_last_layernorm"] is False
    over.write_text("{not json")
    with pytest.raises(UsageError, match="is not json"):
        heads.eagle_architecture(cfg, target, torch.float32)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def eagle_ref(tiny_llama, runtime):
    # warm-started: the TP=2 run (test_tp2_reproduces_tp1) then also checks the gathered rows
    return draft_heads.train(str(tiny_llama), runtime, "eagle3", steps=3, acceptance=True,
                             init_from_target=True)


def test_eagle3_trains_only_the_draft(eagle_ref):
    out = eagle_ref
    first, last = out["losses"][0], out["losses"][-1]
    print({k: [round(s[k], 4) for s in out["losses"]] for k in first})
    assert set(first) == {"lm loss", "eagle ttt-0 loss", "eagle ttt-1 loss", "eagle ttt-0 acc", "eagle ttt-1 acc"}
    assert all(0.0 <= s[k] <= 1.0 for s in out["losses"] for k in s if k.endswith("acc"))
    assert last["eagle ttt-0 loss"] < first["eagle ttt-0 loss"] - 0.05
    assert last["lm loss"] < first["lm loss"]
    assert out["target_unchanged"] and out["n_target"] > 10 and not out["target_grads"]
    assert out["draft"] and all(n.startswith("eagle_module.") for n in out["draft"])
    assert out["in_optimizer"] == out["draft"] and set(out["with_state"]) <= set(out["draft"])
    assert set(out["head"]) == EAGLE3_NAMES
    cfg = out["head_config"]
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 128
    assert cfg["max_position_embeddings"] == 512 and cfg["vocab_size"] == 49152
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1]  # {1, 4//2-1, 4-4}
    kept = torch.arange(128) + out["head"]["d2t"]
    assert kept.tolist() == list(range(128))  # the 64 counted ids, then the lowest unseen ones
    assert out["head"]["fc.weight"].shape == (64, 128) and out["head"]["lm_head.weight"].shape == (128, 64)


@pytest.mark.parametrize("algorithm", ["eagle1", "medusa"])
def test_eagle1_and_medusa_train(tiny_llama, runtime, algorithm):
    out = draft_heads.train(str(tiny_llama), runtime, algorithm, steps=3,
                            draft_vocab=None if algorithm == "medusa" else 128)
    term = "eagle ttt-0 loss" if algorithm == "eagle1" else "medusa head-0 loss"
    assert out["losses"][-1][term] < out["losses"][0][term]
    assert out["target_unchanged"] and not out["target_grads"] and out["in_optimizer"] == out["draft"]
    if algorithm == "medusa":
        assert set(out["head"]) == {"medusa_heads.0.0.linear.weight", "medusa_heads.0.0.linear.bias",
                                    "medusa_heads.0.1.weight", "medusa_heads.1.0.linear.weight",
                                    "medusa_heads.1.0.linear.bias", "medusa_heads.1.1.weight"}
    else:
        assert out["head_config"]["architectures"] == ["LlamaForCausalLMEagle"] and "fc.weight" not in out["head"]


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):  # [b, s, h, d], HF llama style (rotate_half)
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    f = torch.outer(torch.arange(x.shape[1]).float(), inv)
    cos, sin = torch.cat([f, f], -1).cos()[None, :, None], torch.cat([f, f], -1).sin()[None, :, None]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def reference_eagle3_logits(cfg: dict, st: dict, aux: torch.Tensor, next_emb: torch.Tensor) -> torch.Tensor:
    """Step 0 of the draft, written from head_state's docstring: ``aux`` [b, s, k*h] (the aux
    layers' outputs), ``next_emb`` [b, s, h] (embedding of token t+1 at row t)."""
    eps, nh, nkv, hd = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    b, s, _ = aux.shape
    g = aux @ st["fc.weight"].T
    x = torch.cat([_rms(next_emb, st["midlayer.input_layernorm.weight"], eps),
                   _rms(g, st["midlayer.hidden_norm.weight"], eps)], -1)
    q = _rope((x @ st["midlayer.self_attn.q_proj.weight"].T).view(b, s, nh, hd), cfg["rope_theta"])
    k = _rope((x @ st["midlayer.self_attn.k_proj.weight"].T).view(b, s, nkv, hd), cfg["rope_theta"])
    v = (x @ st["midlayer.self_attn.v_proj.weight"].T).view(b, s, nkv, hd)
    a = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    r = g + a.transpose(1, 2).reshape(b, s, nh * hd) @ st["midlayer.self_attn.o_proj.weight"].T
    m = _rms(r, st["midlayer.post_attention_layernorm.weight"], eps)
    r = r + (F.silu(m @ st["midlayer.mlp.gate_proj.weight"].T) * (m @ st["midlayer.mlp.up_proj.weight"].T)) \
        @ st["midlayer.mlp.down_proj.weight"].T
    return _rms(r, st["norm.weight"], eps) @ st["lm_head.weight"].T


@pytest.mark.parametrize("algorithm", ["eagle3", "medusa"])
def test_init_from_target(tiny_llama, runtime, algorithm):
    """--draft-init-from-target: EAGLE's draft lm_head holds the target's rows of the draft
    vocabulary and its final norm the target's; a Medusa head starts as the target's lm_head."""
    model, _ = draft_heads.build(str(tiny_llama), runtime, algorithm, draft_vocab=None if algorithm == "medusa"
                                 else 128, init_from_target=True)
    target = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights \
        else model.output_layer.weight
    if algorithm == "medusa":
        h = torch.randn(5, 1, target.shape[1])
        for head in model.medusa_heads:
            torch.testing.assert_close(head(h)[0], h @ target.T)
        return
    m = model.eagle_module
    ids = torch.arange(128) + m.d2t
    torch.testing.assert_close(m.eagle_output_layer.weight, target[ids])
    torch.testing.assert_close(m.decoder.final_layernorm.weight, model.decoder.final_layernorm.weight)


def test_forward_is_what_the_contract_documents(tiny_llama, runtime):
    """The plugin's step-0 draft logits equal the docstring's reference computed from
    draft_head_state, and the recorded ttt-0 loss is the soft cross entropy to the target's
    next-position distribution renormalised over the draft vocab. Without the fp32 clone of
    prepare_for_training the base LM loss turns the target logits into probabilities in place
    and the loss is wrong."""
    from post_training.speculative.head_state import draft_head_state

    model, _ = draft_heads.build(str(tiny_llama), runtime, "eagle3", ttt=1)
    cfg, st = draft_head_state(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grab: dict = {}

    def keep(key):
        def hook(module, args, out):  # first call only (the draft layer runs once per TTT step)
            grab.setdefault(key, (out[0] if isinstance(out, tuple) else out).clone())
        return hook

    ids_aux = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    hooks = [model.decoder.layers[i].register_forward_hook(keep(f"aux{i}")) for i in ids_aux]
    hooks.append(model.output_layer.register_forward_hook(keep("target")))  # before the in-place CE
    hooks.append(model.eagle_module.eagle_output_layer.register_forward_hook(keep("draft")))

    def loss_term():
        grab.clear()
        with torch.no_grad():
            model(ids, None, None, labels=torch.roll(ids, -1, 1))
        return heads.recorded_terms(model)[0][1]

    model.eval()
    term = loss_term()
    for h in hooks:
        h.remove()
    aux = torch.cat([grab[f"aux{i}"] for i in ids_aux], -1)
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    emb = model.embedding.word_embeddings(nxt)
    ref = reference_eagle3_logits(cfg, st, aux.transpose(0, 1), emb)
    draft = grab["draft"].transpose(0, 1)
    torch.testing.assert_close(draft[:, :-1], ref[:, :-1], rtol=1e-4, atol=1e-5)
    kept = torch.arange(st["d2t"].numel()) + st["d2t"]
    p = grab["target"].transpose(0, 1)[:, 1:, kept].softmax(-1)
    soft_ce = -(p * draft[:, :-1].log_softmax(-1)).sum(-1)
    torch.testing.assert_close(term[:, 1:], soft_ce, rtol=1e-5, atol=1e-5)
    del model.compute_language_model_loss  # the plugin's own: in place on fp32 logits
    assert not torch.allclose(loss_term()[:, 1:], soft_ce, rtol=1e-3, atol=1e-3)


def test_resume_and_load_recreate_the_head(tiny_llama, runtime, tmp_path):
    """A checkpoint carries the ModelOpt eagle state: --load re-creates the head (detected from
    the state) with its trained weights, and a resume from iteration 2 reproduces iterations 3-4."""
    from post_training.config import ModelConfig, SourceConfig
    from post_training.model_builder import setup_model
    from post_training.speculative.head_state import draft_head_state

    model, _ = draft_heads.build(str(tiny_llama), runtime, "eagle3")
    full = loop.run(str(tiny_llama), runtime, iters=4, save=str(tmp_path / "ck"), save_interval=2, model=model)
    _, trained = draft_head_state(model)
    resumed, _ = draft_heads.build(str(tiny_llama), runtime, load=str(tmp_path / "ck" / "iter_0000002"))
    out = loop.run(str(tiny_llama), runtime, iters=4, load=str(tmp_path / "ck" / "iter_0000002"), model=resumed)
    assert out["iteration"] == [3, 4] and out["loss"] == full["loss"][2:]
    assert out["grad_norm"] == full["grad_norm"][2:]
    loaded, _, _ = setup_model(SourceConfig(pretrained_model_path=str(tiny_llama), load=str(tmp_path / "ck")),
                               ModelConfig(), runtime)  # as generate / acceptance load it
    assert heads.draft_kind(loaded) == "eagle"
    _, again = draft_head_state(loaded)
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)


# ----------------------------------------------------------------------------- bad input


def test_bad_input(tiny_llama, tmp_path):
    from dist_utils import clean_env, run_script
    from test_cli import assert_one_line_error

    from post_training.chat_data import build_sft_datasets
    from post_training.config import SFTDataConfig
    from post_training.hf import load_tokenizer

    with pytest.raises(UsageError, match="--eagle-ttt-steps must be >= 1"):
        DraftTrainConfig(eagle_ttt_steps=0)
    with pytest.raises(UsageError, match="larger than the target's vocabulary"):
        DraftTrainConfig(draft_vocab_size=50000).check_target(4, 49152)
    with pytest.raises(UsageError, match="--eagle-aux-layers 4 out of range"):
        DraftTrainConfig(eagle_aux_layers="1,4").check_target(4, 49152)
    with pytest.raises(UsageError, match="EAGLE heads only"):
        DraftTrainConfig(algorithm="medusa", draft_vocab_size=8)
    data = tmp_path / "users.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UsageError, match="no assistant tokens"):
        build_sft_datasets(SFTDataConfig(data_files=str(data)), load_tokenizer(tiny_llama), 32, 0)
    env = clean_env(HF_MODEL_CKPT=str(tiny_llama))
    assert_one_line_error(run_script("eagle3.sh", "--algorithm", "eagle2", "--preflight", env=env),
                          "--algorithm: invalid choice: 'eagle2'")
    assert_one_line_error(run_script("eagle3.sh", "--eagle-aux-layers", "0,9", "--preflight", env=env),
                          "--eagle-aux-layers 9 out of range: the target has 4 layers")


# ----------------------------------------------------------------------------- multi-rank


def test_tp2_reproduces_tp1(mr_tp2, eagle_ref):
    """TP=2 (the shared launch): the draft head sharded over 2 ranks (fc duplicated) trains to the
    losses of TP=1; the gathered head matches; the target stayed frozen."""
    tp2 = mr_tp2["eagle"]
    assert tp2["target_unchanged"] and not tp2["target_grads"]
    for a, b in zip(tp2["losses"], eagle_ref["losses"]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    for k, v in eagle_ref["head"].items():
        torch.testing.assert_close(tp2["head"][k], v, rtol=1e-3, atol=1e-4)
    # the loop's draft AL report on the trained head: every rank the same (checked in the
    # worker), the same tokens and target steps as TP=1
    al1, al2 = eagle_ref["acceptance"], tp2["acceptance"]
    assert al2["al"] >= 1.0 and al2["categories"].keys() == al1["categories"].keys()
    assert (al2["tokens"], al2["steps"]) == (al1["tokens"], al1["steps"])
