"""Worker part (tests/workers/multi.py --batched): greedy batched generation of prompts of
different lengths at this layout, without and with per-row stops (tests/test_synthesis.py
compares both with per-prompt generation at TP=1)."""
import torch
import torch.distributed as dist

from post_training.config import GenerateConfig, ModelConfig, SourceConfig
from post_training.inference.batched import generate_batch
from post_training.model_builder import setup_model

PROMPT_LENGTHS = (5, 12, 9, 1, 12, 3)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 49152, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def stops_of(free: list[list[int]]) -> list[int]:
    """Two stop ids that end rows 0 and 2 early (and maybe others), from the free run."""
    return [free[0][3], free[2][6]]


def run(hf_dir: str, rt, max_new_tokens: int = 14) -> dict:
    model, _, _ = setup_model(SourceConfig(pretrained_model_path=hf_dir), ModelConfig(), rt)
    free = generate_batch(model, prompts(), GenerateConfig(max_new_tokens=max_new_tokens))
    stopped = generate_batch(model, prompts(), GenerateConfig(max_new_tokens=max_new_tokens,
                                                              stop_token_ids=stops_of(free)))
    out = {"free": free, "stopped": stopped}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    if any(e != out for e in every):  # the last stage broadcasts: every rank has the tokens
        raise AssertionError(f"ranks disagree: {every}")
    return out
