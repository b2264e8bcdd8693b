#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/export.sh` runs it with python, which reads only the last line
# Unified Hugging Face checkpoint in EXPORT_DIR from HF_MODEL_CKPT / MLM_MODEL_CKPT (quantized or not).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.export "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
