#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/convert.sh` runs it with python, which reads only the last line
# Two jobs behind one name:
#   bash scripts/convert.sh [CONF]            HF model (default: the embedded one, or HF_MODEL_CKPT)
#                                             -> dist checkpoint in MLM_MODEL_SAVE at this run's TP/PP;
#                                             with MLM_MODEL_CKPT set, reshard that checkpoint instead.
#   bash scripts/convert.sh COMMAND ARGS...   the checkpoint tools (python -m post_training.ckpt):
#                                             inspect, consolidate, merge-lora, to-safetensors, to-gguf.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
case "${1:-}" in
  inspect|consolidate|merge-lora|to-safetensors|to-gguf)
    export PYTHONPATH="$PT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    exec "$(pt_python)" -m post_training.ckpt "$@" ;;
esac
pt_launch post_training.cli.convert "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
