#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/finetune.sh` runs it with python, which reads only the last line
# SFT (and QAT with MLM_MODEL_CKPT / --load of a quantized checkpoint): bash scripts/finetune.sh [CONF] [--train-iters N] [--finetune-data-files F]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.train "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
