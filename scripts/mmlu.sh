#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/mmlu.sh` runs it with python, which reads only the last line
# Zero-shot MMLU-format accuracy (Megatron-LM's mmlu.sh): evaluate.sh without the perplexity;
# --mmlu-path FILE (.csv/.jsonl), default the sample in examples/eval/. Last line: "mmlu accuracy <value>".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
mmlu=()
[[ " $* ${MLM_EXTRA_ARGS:-} " == *" --mmlu-path"* ]] || mmlu=(--mmlu-path "$PT_ROOT/examples/eval/mmlu_general_knowledge.csv")
conf=()
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then conf=("$1"); shift; fi
pt_launch post_training.cli.evaluate "${conf[@]}" --skip-perplexity "${mmlu[@]}" "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
