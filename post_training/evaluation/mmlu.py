"""Zero-shot multiple-choice accuracy on MMLU-format questions, correct at any TP/PP/DP: each
answer letter scored by its log-likelihood after the prompt (format and prompt:
:mod:`post_training.evaluation.inputs`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from post_training.evaluation.inputs import Question, encode
from post_training.evaluation.perplexity import dp_shard
from post_training.inference import stage_forward
from post_training.runtime.collectives import last_stage_dp_sum


@dataclass
class ChoiceResult:
    loglik: torch.Tensor  # [questions, 4] fp64 log-likelihood of each answer letter
    answers: list[int]

    @property
    def predictions(self) -> list[int]:
        return self.loglik.argmax(dim=1).tolist()  # argmax returns the first maximum

    @property
    def correct(self) -> int:
        return sum(p == a for p, a in zip(self.predictions, self.answers))

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.answers)


@torch.inference_mode()
def score(model, questions: list[Question], tokenizer, micro_batch_size: int = 1) -> ChoiceResult:
    """Log-likelihood of each answer letter for each question. Collective: every rank calls it
    with the same questions and gets the same result. ``micro_batch_size`` questions (4
    right-padded sequences each; causal attention makes the padding harmless) per forward."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loglik = torch.zeros(len(questions), 4, dtype=torch.float64, device=device)
    mine = list(dp_shard(len(questions)))
    for start in range(0, len(mine), micro_batch_size):
        idx = mine[start:start + micro_batch_size]
        seqs, spans = [], []
        for i in idx:
            ctx, conts = encode(questions[i], tokenizer)
            for c in conts:
                seqs.append(ctx + c)
                spans.append((len(ctx), c))
        width = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=device)
        logits = stage_forward(model, tokens, None)
        if logits is None:  # not the last stage
            continue
        for row, (n_ctx, cont) in enumerate(spans):
            logp = torch.log_softmax(logits[row, n_ctx - 1:n_ctx - 1 + len(cont)].float(), dim=-1)
            target = torch.tensor(cont, device=device).unsqueeze(1)
            loglik[idx[row // 4], row % 4] = logp.gather(1, target).double().sum()
    return ChoiceResult(loglik=last_stage_dp_sum(loglik), answers=[q.answer for q in questions])
