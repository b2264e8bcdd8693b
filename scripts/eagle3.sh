#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/eagle3.sh` runs it with python, which reads only the last line
# Draft-head training (EAGLE-3 / EAGLE-1 / Medusa, ModelOpt): bash scripts/eagle3.sh [CONF] [--algorithm eagle3|eagle1|medusa] [--draft-vocab-size N] [--train-iters N]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.eagle3 "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
