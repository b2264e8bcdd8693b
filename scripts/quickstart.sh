#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default model (no GPU, no network
# besides the package registry): FP8 post-training quantization of SmolLM2-135M-Instruct, with
# the model's answers before and after. Extra flags go to quantize.sh (e.g. a QUANT_CFG name).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
echo "[quickstart] quantizing the embedded SmolLM2-135M-Instruct (TP=${TP:-1}); answers before and after"
bash "$ROOT/scripts/quantize.sh" HuggingFaceTB/SmolLM2-135M-Instruct "${QUANT_CFG:-FP8_DEFAULT_CFG}" \
  --calib-size 16 "$@"
