#!/usr/bin/env bash
# HF model (default: the embedded one, or HF_MODEL_CKPT) -> dist checkpoint in MLM_MODEL_SAVE at
# this run's TP/PP. With MLM_MODEL_CKPT set it reshards an existing dist checkpoint instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.convert "$@"
