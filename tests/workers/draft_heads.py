"""Draft-head training on the tiny model (post_training/speculative/heads.py): convert, a few
optimizer steps on a fixed batch, what changed. Called in-process by tests/test_draft_heads.py
(TP=1) and by tests/workers/multi.py (--eagle, TP=2)."""
from __future__ import annotations

import torch

from post_training.config import BatchConfig, DraftTrainConfig, ModelConfig, SourceConfig, TrainConfig
from post_training.model_builder import setup_model
from post_training.speculative import heads
from post_training.speculative.head_state import draft_head_state
from post_training.training import build_optimizer, microbatches, train_step

VOCAB_RANGE = 64  # the batches' token ids (a tiny random target is confident about few of them)


def counts(vocab_size: int) -> torch.Tensor:
    """Stand-in token frequencies: the batch's id range, id 7 the most frequent."""
    c = torch.zeros(vocab_size, dtype=torch.int64)
    c[:VOCAB_RANGE] = 10
    c[7] = 100
    return c


def build(hf_dir: str, rt, algorithm: str = "eagle3", draft_vocab: int | None = 128, ttt: int = 2,
          load: str | None = None, seq_length: int = 16, **extra):
    model, _, hfc = setup_model(SourceConfig(pretrained_model_path=hf_dir, load=load),
                                ModelConfig(seq_length=seq_length), rt, inference=False)
    if heads.draft_kind(model) is None:
        cfg = DraftTrainConfig(algorithm=algorithm, draft_vocab_size=draft_vocab, eagle_ttt_steps=ttt, **extra)
        d2t = heads.calibrate_d2t(counts(hfc.vocab_size), draft_vocab) if draft_vocab else None
        model = heads.convert_model(model, cfg, hfc, rt, d2t)
    heads.prepare_for_training(model)
    return model, hfc


def batch(rt, bcfg: BatchConfig, seq_length: int = 16, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB_RANGE, (bcfg.global_size(rt.dp), seq_length + 1), generator=g)
    mask = (torch.rand(tokens.shape, generator=g) > 0.2).long()
    return microbatches(tokens, bcfg, rt, loss_mask=mask)


ACCEPTANCE_OSL = 8


def train(hf_dir: str, rt, algorithm: str = "eagle3", steps: int = 5, lr: float = 1e-2,
          acceptance: bool = False, **kw) -> dict:
    """``acceptance``: then the training loop's draft AL report on the trained head (osl 8)."""
    model, hfc = build(hf_dir, rt, algorithm, **kw)
    target = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    draft = {n for n, p in model.named_parameters() if p.requires_grad}
    bcfg = BatchConfig(micro_batch_size=2, global_batch_size=2)
    ddp, opt, sched = build_optimizer(model, TrainConfig(lr=lr, train_iters=steps), bcfg, 1234)
    mbs = batch(rt, bcfg)
    losses = [train_step(ddp, opt, sched, mbs, bcfg).losses for _ in range(steps)]
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    in_opt = {by_id[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in by_id}
    with_state = {by_id[id(p)] for p in opt.optimizer.state if id(p) in by_id}
    config, state = draft_head_state(model, hfc)
    report = None
    if acceptance:
        from post_training.hf import load_tokenizer
        from post_training.non_loss_data_func import draft_acceptance_tracker

        report = draft_acceptance_tracker(load_tokenizer(hf_dir), hfc, osl=ACCEPTANCE_OSL)(ddp)
    return {
        "acceptance": report,
        "losses": losses,
        "target_unchanged": all(torch.equal(params[n], t) for n, t in target.items()),
        "target_grads": [n for n in target if params[n].grad is not None
                         or getattr(params[n], "main_grad", None) is not None],
        "draft": sorted(draft), "in_optimizer": sorted(in_opt), "with_state": sorted(with_state),
        "n_target": len(target), "head_config": config, "head": state,
    }
