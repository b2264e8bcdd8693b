"""Magpie-style synthesis of chat data: ``scripts/synthesize.sh`` (see post_training/synthesis.py)."""
from __future__ import annotations

import dataclasses
import json
import time

from post_training import arguments, hf
from post_training.cli import run_entry
from post_training.synthesis import Synthesizer, batched_generator, read_topics, user_turn_prefix
from post_training.utils import UsageError, print_rank_0, rank

GROUPS = ["runtime", "model", "source", "generate", "synth"]
DEFAULTS = {"generate.max_new_tokens": 256}  # room for a whole answer (cut ones are counted)


def _dedup_across(parts: list[list[dict]]) -> list[dict]:
    """DP ranks sample independently: keep the first of questions repeated across ranks."""
    from post_training.synthesis import normalize

    seen, out = set(), []
    for convs in parts:
        for c in convs:
            key = tuple(normalize(m["content"]) for m in c["messages"] if m["role"] == "user")
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def main(argv: list[str]) -> int:
    args = arguments.parse(argv, GROUPS, prog="synthesize.sh", defaults=DEFAULTS,
                           description="Magpie-style self-synthesis of chat data: the model writes "
                                       "user questions from its own chat template, then answers them")
    synth, seq_length = args.synth, args.model.seq_length
    if synth.output is None:
        raise UsageError("--output is required (the jsonl file to write)")
    hf.check_source(args.source, args.runtime)
    topics = read_topics(synth.topics_file)
    hf_dir = hf.source_hf_dir(args.source)
    tok = hf.load_tokenizer(hf_dir)
    prefix = tok(user_turn_prefix(tok, []), add_special_tokens=False)["input_ids"]
    need = len(prefix) + synth.max_question_tokens + args.generate.max_new_tokens
    if need > seq_length:
        raise UsageError(f"the first turn needs up to {need} tokens (template {len(prefix)} + "
                         f"--max-question-tokens + --max-new-tokens) but --seq-length is {seq_length}")
    if args.preflight:
        return 0
    from megatron.core import parallel_state as ps

    from post_training.generate import stop_token_ids
    from post_training.io.atomic import staged_file
    from post_training.model_builder import setup_model
    from post_training.runtime import init_runtime, memory_report
    from post_training.runtime.collectives import gather_objects

    rt = init_runtime(args.runtime)
    model, tok, hf_config = setup_model(args.source, args.model, rt, hf_dir=hf_dir)
    gcfg = dataclasses.replace(args.generate, stop_token_ids=stop_token_ids(tok, hf_config))
    # Each data-parallel replica synthesizes its share with its own seed.
    dp, dp_size = rt.dp_rank, ps.get_data_parallel_world_size()
    share = synth.num_conversations // dp_size + (dp < synth.num_conversations % dp_size)
    syn = Synthesizer(tok, batched_generator(model, seq_length), synth, gcfg, seq_length, topics,
                      seed=args.runtime.seed + 1_000_003 * dp)
    t0 = time.perf_counter()
    convs = syn.run(share, lambda kept, started: print_rank_0(
        f"synthesis: {kept}/{share} conversations kept of {started} started"
        + (f" (data-parallel rank 0 of {dp_size})" if dp_size > 1 else "")))
    wall = time.perf_counter() - t0
    parts = {d: (c, s) for d, c, s in gather_objects((dp, convs, syn.stats))}
    convs = _dedup_across([parts[d][0] for d in sorted(parts)])
    stats = [parts[d][1] for d in sorted(parts)]
    if rank() == 0:
        with staged_file(synth.output, overwrite=True) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for c in convs:
                    f.write(json.dumps(c, ensure_ascii=False) + "\n")
    seqs, toks = sum(s.sequences for s in stats), sum(s.tokens for s in stats)
    rejected = sum((s.rejected for s in stats), start=type(stats[0].rejected)())
    cut = sum(s.answers_cut for s in stats)
    if len(convs) < synth.num_conversations:
        print_rank_0(f"warning: kept {len(convs)} of --num-conversations {synth.num_conversations} "
                     "(the model kept producing rejected or duplicate questions)")
    if rejected:
        print_rank_0("rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())))
    print_rank_0(f"{cut} kept answers stopped at --max-new-tokens {gcfg.max_new_tokens}")
    print_rank_0(memory_report("memory"))
    print_rank_0(f"wrote {len(convs)} conversations ({synth.num_turns} turns each) to {synth.output}")
    print_rank_0(f"generated {seqs} sequences, {toks} tokens in {wall:.1f} s: "
                 f"{seqs / wall:.2f} sequences/s, {toks / wall:.1f} tokens/s")
    return 0


def cli_main() -> None:
    run_entry(main)


if __name__ == "__main__":
    cli_main()
