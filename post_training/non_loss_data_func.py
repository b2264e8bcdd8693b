"""Non-loss reports a training loop calls between iterations (Megatron-LM's module name).

:func:`report_draft_acceptance_length` is Megatron-LM's quick acceptance check while a draft
(EAGLE / Medusa head, draft model) trains: the first prompt of each category, first turn only, so
it costs 8 short greedy answers. The full measurement is ``scripts/acceptance.sh``.

:func:`draft_acceptance_tracker` is what ``scripts/eagle3.sh`` hands the training loop: every
``--eval-interval`` it builds the native drafter of ``--draft eagle|medusa`` from the head being
trained (:func:`live_head_drafter`: ``draft_head_state`` of the live model, no checkpoint round
trip) and runs the report with the target decoding as the plain GPTModel
(:func:`plain_target`), then training continues on the unchanged model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

from post_training.config.speculative import BUILTIN_PROMPTS
from post_training.utils import print_rank_0, unwrap

__all__ = ["report_draft_acceptance_length", "live_head_drafter", "plain_target", "draft_acceptance_tracker",
           "AL_DEFINITION"]

AL_DEFINITION = "generated tokens / target steps, ratio of sums over the prompts (Megatron-LM's)"


def report_draft_acceptance_length(model, tokenizer, drafter, osl: int = 64, draft_steps: int = 7,
                                   mtbench_path: str = BUILTIN_PROMPTS,
                                   stop_token_ids: list[int] | None = None,
                                   max_seq_length: int | None = None, quiet: bool = False) -> dict:
    """Print ``{category} AL x AR y`` for the first prompt of each category and the average
    (AL: generated tokens / target steps, ratio of sums; AR = AL / (draft_steps + 1)); return
    ``{category: {"al", "ar", "tokens", "steps"}, ..., "average": {...}}``. ``model`` may be
    the training loop's list of (DDP-wrapped) chunks; its train / eval mode is restored.
    ``quiet``: no lines (the caller prints its own)."""
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
        if not quiet:
            print_rank_0(f"{name} AL {g['al']:.2f} AR {g['ar']:.2f}")
    return out


def live_head_drafter(model, hf_config: Any = None):
    """The drafter of ``--draft eagle|medusa`` for the head ``model`` trains now (ModelOpt
    converted, possibly DDP-wrapped): a native fp32 copy of its current weights. Collective
    (TP gathers); PP=1, as draft-head training is."""
    from post_training.speculative.eagle_draft import build_head
    from post_training.speculative.head_drafter import head_drafter
    from post_training.speculative.head_layout import HeadConfig
    from post_training.speculative.head_state import draft_head_state

    model = unwrap(model)
    config, state = draft_head_state(model, hf_config)
    return head_drafter(build_head(HeadConfig.from_hf(config), state, where="the head being trained"), model)


@contextmanager
def plain_target(model):
    """Within: ``model`` (ModelOpt EAGLE / Medusa converted) forwards as the plain GPTModel (the
    KV-cache forward generation needs; the converted forward is the training one). The EAGLE
    plugin's layer hooks keep a copy of every forward's aux states until its next training
    forward concatenates them: what the plain forwards left there is dropped on the way out,
    or the next training step would read them."""
    from types import MethodType

    from megatron.core.models.gpt import GPTModel

    model = unwrap(model)
    had = "forward" in vars(model)
    saved = vars(model).get("forward")
    model.forward = MethodType(GPTModel.forward, model)
    try:
        yield model
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward
        aux = getattr(model, "_aux_hidden_states", None)
        if aux is not None:
            aux.clear()


def draft_acceptance_tracker(tokenizer, hf_config, *, osl: int = 64, draft_steps: int = 3,
                             mtbench_path: str = BUILTIN_PROMPTS) -> Callable[[Any], dict]:
    """``f(model) -> record`` for the training loop's ``non_loss_data_func``: the acceptance report
    of the head being trained (first prompt of each category, first turn, greedy, ``osl`` tokens,
    ``draft_steps`` per target step), printed as one ``draft AL`` line; the record is
    ``{"kind": "acceptance", "al", "categories": {category: al}, ...}`` (the loop adds the
    iteration and the consumed samples / tokens). The same on every rank."""
    from post_training.generate import stop_token_ids

    stops = stop_token_ids(tokenizer, hf_config)

    def track(model) -> dict:
        drafter = live_head_drafter(model, hf_config)
        with plain_target(model) as target:
            out = report_draft_acceptance_length(target, tokenizer, drafter, osl=osl, draft_steps=draft_steps,
                                                 mtbench_path=mtbench_path, stop_token_ids=stops, quiet=True)
        cats = {c: g["al"] for c, g in out.items() if c != "average"}
        avg = out["average"]
        print_rank_0(f"draft AL (tokens / target steps, ratio of sums; K={draft_steps}, osl {osl}): "
                     f"{avg['al']:.3f} | " + " | ".join(f"{c} {al:.2f}" for c, al in cats.items()) + " |")
        return {"kind": "acceptance", "al": avg["al"], "ar": avg["ar"], "tokens": avg["tokens"],
                "steps": avg["steps"], "categories": cats, "draft_steps": draft_steps, "osl": osl,
                "definition": AL_DEFINITION}

    return track
