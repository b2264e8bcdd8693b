#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/quantize.sh` runs it with python, which reads only the last line
# PTQ with ModelOpt: bash scripts/quantize.sh [CONF] [QUANT_CFG] [flags]
# QUANT_CFG: a ModelOpt config name (FP8_DEFAULT_CFG, INT8_SMOOTHQUANT_CFG, NVFP4_DEFAULT_CFG, ...)
# or a yaml/json recipe; default FP8_DEFAULT_CFG. MLM_MODEL_SAVE: where the quantized checkpoint goes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
conf=()
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then conf=("$1"); shift; fi
qcfg="${QUANT_CFG:-FP8_DEFAULT_CFG}"
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then qcfg="$1"; shift; fi
pt_launch post_training.cli.quantize "${conf[@]}" --export-quant-cfg "$qcfg" "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
