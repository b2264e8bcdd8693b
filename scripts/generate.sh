#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/generate.sh` runs it with python, which reads only the last line
# Chat generation with the KV cache: bash scripts/generate.sh [CONF] [--prompts-file F] [--max-new-tokens N] [--draft ngram|model --draft-steps K]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.generate "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
