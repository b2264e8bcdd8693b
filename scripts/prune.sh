#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/prune.sh` runs it with python, which reads only the last line
# Minitron pruning with ModelOpt: bash scripts/prune.sh [CONF] --prune-export-config '{"num_layers": 15}'
# Targets: num_layers (depth), hidden_size, ffn_hidden_size, num_attention_heads (width). TP=1 (PP
# allowed). MLM_MODEL_SAVE: where the pruned checkpoint goes (every other script loads it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.prune "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
