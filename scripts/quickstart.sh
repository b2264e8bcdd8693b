#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default model (no GPU, no network besides
# the package registry): FP8 post-training quantization of SmolLM2-135M-Instruct, calibrated on
# the built-in chat set, with the answers and perplexity before and after, saved as a dist
# checkpoint in outputs/quickstart (MLM_MODEL_SAVE). Extra flags go to quantize.sh; QUANT_CFG
# picks another format.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
export MLM_MODEL_SAVE="${MLM_MODEL_SAVE:-$ROOT/outputs/quickstart}"
start=$SECONDS
echo "[quickstart] ${QUANT_CFG:-FP8_DEFAULT_CFG} PTQ of the embedded SmolLM2-135M-Instruct (TP=${TP:-1})"
bash "$ROOT/scripts/quantize.sh" HuggingFaceTB/SmolLM2-135M-Instruct "${QUANT_CFG:-FP8_DEFAULT_CFG}" \
  --calib-dataset builtin-chat --calib-size 28 --calib-seq-length 256 "$@"
echo "[quickstart] done in $((SECONDS - start))s"
