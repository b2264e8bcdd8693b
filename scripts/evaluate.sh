#!/usr/bin/env bash
# Perplexity over --seq-length windows (+ --mmlu-path accuracy); the last stdout line is "perplexity <value>".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
pt_launch post_training.cli.evaluate "$@"
