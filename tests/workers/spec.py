"""Worker part: speculative generation at this layout (multi.py --spec). Every rank runs the same
loop; the result is every rank's tokens so the test sees that all ranks agree."""
import torch.distributed as dist

from post_training.config import GenerateConfig, ModelConfig, SourceConfig
from post_training.generate import generate
from post_training.model_builder import setup_model
from post_training.speculative import ModelDrafter, NgramDrafter, speculative_generate

PROMPT = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 911, 42]


def run(hf_dir: str, rt) -> dict:
    """Plain greedy, n-gram and model drafter (the target model itself as its own draft, run
    at this layout), random EAGLE-3 / EAGLE-1 / Medusa heads, and a sampled run, with their
    acceptance counts."""
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir), ModelConfig(), rt)
    g = GenerateConfig(max_new_tokens=24)
    out = {"prompt": PROMPT, "plain": generate(model, PROMPT, g)}
    for name, drafter in (("ngram", NgramDrafter(3)), ("model", ModelDrafter(model))):
        tokens, st = speculative_generate(model, PROMPT, drafter, g, 3)
        out[name] = {"tokens": tokens, "accepted": st.accepted}
    # Trained-head drafters with random heads (lossless whatever they propose): the target's hidden
    # states gathered at this layout, the head run on every rank.
    import json
    from pathlib import Path

    from post_training.speculative.eagle_draft import build_head
    from post_training.speculative.head_layout import HeadConfig, head_config_for, random_head_state
    from post_training.speculative.head_drafter import head_drafter

    tcfg = json.loads((Path(hf_dir) / "config.json").read_text())
    for kind, dv in (("eagle3", 4096), ("eagle1", None), ("medusa", None)):
        cfg = head_config_for(tcfg, kind, dv)
        drafter = head_drafter(build_head(HeadConfig.from_hf(cfg), random_head_state(cfg, seed=1)), model)
        tokens, st = speculative_generate(model, PROMPT, drafter, g, 3)
        out[kind] = {"tokens": tokens, "accepted": st.accepted, "drafted": st.drafted}
    sampled = GenerateConfig(max_new_tokens=16, temperature=1.0, top_k=20)
    out["sampled"] = speculative_generate(model, PROMPT, NgramDrafter(2), sampled, 3, seed=5)[0]
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, out)
    return {"ranks": ranks}
