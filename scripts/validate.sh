#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/validate.sh` runs it with python, which reads only the last line
# Megatron-LM's name for scripts/acceptance.sh (same flags): bash scripts/validate.sh [CONF] [--draft ngram|model] [--draft-steps K]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.acceptance "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
