#!/usr/bin/env bash
# Chat generation with the KV cache: bash scripts/generate.sh [CONF] [--prompts-file F] [--max-new-tokens N]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.generate "$@"
