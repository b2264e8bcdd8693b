#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/generate.sh` runs it with python, which reads only the last line
# Magpie-style chat-data synthesis: bash scripts/synthesize.sh [CONF] --output F.jsonl [--num-conversations N] [--topics-file F]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.synthesize "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
