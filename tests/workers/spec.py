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
    at this layout), and a sampled run, with their acceptance counts."""
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir), ModelConfig(), rt)
    g = GenerateConfig(max_new_tokens=24)
    out = {"prompt": PROMPT, "plain": generate(model, PROMPT, g)}
    for name, drafter in (("ngram", NgramDrafter(3)), ("model", ModelDrafter(model))):
        tokens, st = speculative_generate(model, PROMPT, drafter, g, 3)
        out[name] = {"tokens": tokens, "accepted": st.accepted}
    sampled = GenerateConfig(max_new_tokens=16, temperature=1.0, top_k=20)
    out["sampled"] = speculative_generate(model, PROMPT, NgramDrafter(2), sampled, 3, seed=5)[0]
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, out)
    return {"ranks": ranks}
