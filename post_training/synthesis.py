"""Magpie-style self-synthesis of chat data: the model writes the questions and the answers.

An aligned chat model, fed its chat template up to the point where a user's message begins,
continues with a plausible user message (Magpie, Xu et al. 2024). Where that point is comes
from the template itself (:func:`user_turn_prefix`): the conversation so far plus a dummy user
message is rendered and cut where the dummy's content begins, so the template's default system
prompt and its turn markers are whatever the model was trained with. The question is sampled
(``SynthConfig.question_*``) until the template's end-of-turn token; the answer comes from the
rendered conversation with the generation prompt, with the GenerateConfig settings (greedy by
default). Both phases run many conversations at once (:func:`generate_batch`).

Seed topics (optional) are injected as the *beginning of the first user message*
(:data:`TOPIC_LEAD`: "I have a question about <topic>."), and the model continues the message;
the stored question includes that lead. Later turns are not seeded.

Kept: questions and answers that are not empty, not cut off (questions must end with the
end-of-turn token within ``max_question_tokens``; answers may stop at ``max_new_tokens``, and
are counted), carry no template tokens, are not degenerate repetition, and whose question is
new, exactly and after normalization (case, punctuation, spacing). A conversation with a
rejected turn is dropped whole, so every kept one has ``num_turns`` exchanges.
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from post_training.config import GenerateConfig, SynthConfig
from post_training.data import render_prompt
from post_training.utils import UsageError

__all__ = ["TOPIC_LEAD", "SynthStats", "Synthesizer", "batched_generator", "end_of_turn_ids",
           "normalize", "problem", "read_topics", "user_turn_prefix"]

# A first-person lead: SmolLM2-135M continues it with a question ("... Can you help me ...?")
# and ends the turn, where "About <topic>: " drew an encyclopedia answer that never stopped.
TOPIC_LEAD = "I have a question about {topic}."
_DUMMY = "\u2063PT-SYNTH-USER\u2063"  # cannot occur in a template
MAX_ATTEMPTS_PER_CONVERSATION = 4  # stop when the model keeps producing rejects


def batched_generator(model, max_seq_length: int | None = None):
    """The ``generate`` of a :class:`Synthesizer`: batched KV-cache generation on ``model``
    (megatron-core is imported here, not with this module: the CLI's preflight stays light)."""
    from post_training.inference.batched import generate_batch

    def generate(prompts: list[list[int]], cfg: GenerateConfig, seed: int) -> list[list[int]]:
        return generate_batch(model, prompts, cfg, seed=seed, max_seq_length=max_seq_length)

    return generate


def read_topics(path: str | None) -> list[str] | None:
    """Seed topics, one a line (blank lines and lines starting with # skipped)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --topics-file {path}: {e}") from None
    topics = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
    if not topics:
        raise UsageError(f"--topics-file {path} lists no topic (one a line)")
    return topics


def _render(tok, messages: list[dict], generation_prompt: bool = False) -> str:
    if not getattr(tok, "chat_template", None):
        raise UsageError("synthesis needs a chat template: the tokenizer has none")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def user_turn_prefix(tok, history: list[dict]) -> str:
    """The template rendered up to where the next user message's content begins: ``history``
    (earlier turns, a system message if any) and a dummy user message, cut at its content."""
    text = _render(tok, [*history, {"role": "user", "content": _DUMMY}])
    if text.count(_DUMMY) != 1:
        raise UsageError("the chat template does not render the user message verbatim; "
                         "cannot find where a user turn begins")
    return text[:text.index(_DUMMY)]


def end_of_turn_ids(tok) -> list[int]:
    """The special token the template puts right after a user message's content
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...), or none."""
    text = _render(tok, [{"role": "user", "content": _DUMMY}])
    after = tok(text[text.index(_DUMMY) + len(_DUMMY):], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return [after[0]] if after and after[0] in special else []


def normalize(text: str) -> str:
    """The dedup key: lower case, punctuation and spacing folded."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def problem(text: str, ids: list[int], stopped: bool, special: set[int], need_stop: bool) -> str | None:
    """Why a generated message is rejected (None: kept). ``ids``: its tokens without the stop."""
    if need_stop and not stopped:
        return "cut off"
    if len(normalize(text).split()) < 2:
        return "empty"
    if any(t in special for t in ids):
        return "template tokens"
    if len(ids) >= 16 and len(set(ids)) < 0.25 * len(ids):
        return "repetitive"
    return None


@dataclass
class SynthStats:
    """What a run generated: every sequence (questions and answers, rejected ones included)."""

    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0
    answers_cut: int = 0  # kept answers that stopped at --max-new-tokens
    rejected: Counter = field(default_factory=Counter)  # "question: duplicate" -> count

    def add(self, outs: list[list[int]], seconds: float) -> None:
        self.sequences += len(outs)
        self.tokens += sum(map(len, outs))
        self.seconds += seconds


class Synthesizer:
    """Generates conversations on one model-parallel group (every rank runs it alike).

    ``generate(prompts, cfg, seed)`` is the batched generator (a closure over the model:
    :func:`post_training.inference.batched.generate_batch`)."""

    def __init__(self, tok, generate: Callable[[list[list[int]], GenerateConfig, int], list[list[int]]],
                 synth: SynthConfig, answer_cfg: GenerateConfig, max_seq_length: int,
                 topics: list[str] | None = None, seed: int = 1234) -> None:
        self.tok, self.generate, self.synth = tok, generate, synth
        self.max_seq_length, self.topics, self.seed = max_seq_length, topics, seed
        stops = sorted(set(answer_cfg.stop_token_ids) | set(end_of_turn_ids(tok)))
        if not stops:
            raise UsageError("neither the tokenizer nor the chat template names an end-of-turn token")
        self.answer_cfg = dataclasses.replace(answer_cfg, stop_token_ids=stops)
        self.question_cfg = GenerateConfig(max_new_tokens=synth.max_question_tokens,
                                           temperature=synth.question_temperature,
                                           top_p=synth.question_top_p, stop_token_ids=stops)
        self.special = set(tok.all_special_ids) - set(stops)
        self.seen: set[str] = set()
        self.stats = SynthStats()
        self.started = 0  # conversations begun (indexes the topics)
        user_turn_prefix(tok, [])  # a template we cannot cut fails here, before any model work

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]  # the template has its BOS

    def _split(self, out: list[int]) -> tuple[list[int], bool]:
        stopped = bool(out) and out[-1] in self.answer_cfg.stop_token_ids
        return (out[:-1] if stopped else out), stopped

    def _run(self, prompts: list[list[int]], cfg: GenerateConfig, seed: int) -> list[list[int]]:
        t0 = time.perf_counter()
        outs = self.generate(prompts, cfg, seed)
        self.stats.add(outs, time.perf_counter() - t0)
        return outs

    def _fits(self, convs: list[dict], prompts: list[list[int]], new: int, what: str) -> tuple[list, list]:
        keep = [i for i, p in enumerate(prompts) if len(p) + new <= self.max_seq_length]
        self.stats.rejected[f"{what}: over --seq-length"] += len(prompts) - len(keep)
        return [convs[i] for i in keep], [prompts[i] for i in keep]

    def _questions(self, convs: list[dict], turn: int, seed: int) -> list[dict]:
        prompts = []
        for c in convs:
            text = user_turn_prefix(self.tok, c["messages"]) + c["lead"] if turn == 0 else \
                user_turn_prefix(self.tok, c["messages"])
            prompts.append(self._ids(text))
        convs, prompts = self._fits(convs, prompts, self.question_cfg.max_new_tokens, "question")
        alive = []
        for c, out in zip(convs, self._run(prompts, self.question_cfg, seed) if prompts else []):
            ids, stopped = self._split(out)
            text = ((c["lead"] if turn == 0 else "") + self.tok.decode(ids, skip_special_tokens=True)).strip()
            why = problem(text, ids, stopped, self.special, need_stop=True)
            key = normalize(text)
            if why is None and (text in self.seen or key in self.seen):
                why = "duplicate"
            if why is not None:
                self.stats.rejected[f"question: {why}"] += 1
                continue
            self.seen.update((text, key))
            c["messages"].append({"role": "user", "content": text})
            alive.append(c)
        return alive

    def _answers(self, convs: list[dict], seed: int) -> list[dict]:
        prompts = [render_prompt(c["messages"], self.tok) for c in convs]
        convs, prompts = self._fits(convs, prompts, self.answer_cfg.max_new_tokens, "answer")
        alive = []
        for c, out in zip(convs, self._run(prompts, self.answer_cfg, seed) if prompts else []):
            ids, stopped = self._split(out)
            text = self.tok.decode(ids, skip_special_tokens=True).strip()
            why = problem(text, ids, stopped, self.special, need_stop=False)
            if why is not None:
                self.stats.rejected[f"answer: {why}"] += 1
                continue
            self.stats.answers_cut += not stopped
            c["messages"].append({"role": "assistant", "content": text})
            alive.append(c)
        return alive

    def round(self, n: int, round_index: int) -> list[dict]:
        """Start ``n`` conversations and return the ones that survive every turn, as
        ``{"messages": [...]}`` records."""
        convs = []
        for i in range(self.started, self.started + n):
            lead = TOPIC_LEAD.format(topic=self.topics[i % len(self.topics)]) if self.topics else ""
            convs.append({"messages": [], "lead": lead})
        self.started += n
        for turn in range(self.synth.num_turns):
            seed = self.seed + 7919 * round_index + 2 * turn
            convs = self._questions(convs, turn, seed)
            convs = self._answers(convs, seed + 1)
        return [{"messages": c["messages"]} for c in convs]

    def run(self, n: int, progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Up to ``n`` conversations, in rounds of ``SynthConfig.batch_size``; gives up after
        ``MAX_ATTEMPTS_PER_CONVERSATION * n`` started conversations."""
        kept: list[dict] = []
        budget, r = MAX_ATTEMPTS_PER_CONVERSATION * n, 0
        while len(kept) < n and self.started < budget:
            size = min(self.synth.batch_size, n - len(kept), budget - self.started)
            kept += self.round(size, r)[: n - len(kept)]
            r += 1
            if progress is not None:
                progress(len(kept), self.started)
        return kept
