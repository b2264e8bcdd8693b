#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/evaluate.sh` runs it with python, which reads only the last line
# Perplexity over --seq-length windows (+ --mmlu-path accuracy); the last stdout line is "perplexity <value>".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.evaluate "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
