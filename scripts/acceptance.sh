#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/acceptance.sh` runs it with python, which reads only the last line
# Acceptance length of a drafter on MT-Bench-style prompts: bash scripts/acceptance.sh [CONF] [--draft ngram|model] [--draft-steps K] [--osl N] [--mtbench-path F]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.acceptance "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
