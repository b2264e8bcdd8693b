"""Non-loss reports a training loop calls between iterations (Megatron-LM's module name).

:func:`report_draft_acceptance_length` is Megatron-LM's quick acceptance check while a draft
(EAGLE / Medusa head, draft model) trains: the first prompt of each category, first turn only, so
it costs 8 short greedy answers. The full measurement is ``scripts/acceptance.sh``.
"""
from __future__ import annotations

from post_training.config.speculative import BUILTIN_PROMPTS
from post_training.utils import print_rank_0, unwrap

__all__ = ["report_draft_acceptance_length"]


def report_draft_acceptance_length(model, tokenizer, drafter, osl: int = 64, draft_steps: int = 7,
                                   mtbench_path: str = BUILTIN_PROMPTS,
                                   stop_token_ids: list[int] | None = None,
                                   max_seq_length: int | None = None) -> dict:
    """Print ``{category} AL x AR y`` for the first prompt of each category and the average
    (AL: generated tokens / target steps, ratio of sums; AR = AL / (draft_steps + 1)); return
    ``{category: {"al", "ar", "tokens", "steps"}, ..., "average": {...}}``. ``model`` may be
    the training loop's list of (DDP-wrapped) chunks; its train / eval mode is restored."""
    from post_training.speculative.acceptance import measure_acceptance, summarize
    from post_training.speculative.mtbench import load_mtbench, select_prompts

    if isinstance(model, (list, tuple)):
        model = model[0]
    model = unwrap(model)
    prompts = select_prompts(load_mtbench(mtbench_path), num_prompts=1)
    if stop_token_ids is None:
        stop_token_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    results = measure_acceptance(model, tokenizer, drafter, prompts, osl=osl, draft_steps=draft_steps,
                                 stop_token_ids=stop_token_ids, max_seq_length=max_seq_length)
    summary = summarize(results, draft_steps)
    out = {}
    for name, g in [*summary["categories"].items(), ("average", summary["overall"])]:
        out[name] = {"al": g["al"], "ar": g["ar"], "tokens": g["tokens"], "steps": g["steps"]}
        print_rank_0(f"{name} AL {g['al']:.2f} AR {g['ar']:.2f}")
    return out
