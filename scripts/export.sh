#!/usr/bin/env bash
# Unified Hugging Face checkpoint in EXPORT_DIR from HF_MODEL_CKPT / MLM_MODEL_CKPT (quantized or not).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.export "$@"
