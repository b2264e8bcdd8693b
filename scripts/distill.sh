#!/usr/bin/env bash
""":" # bash script; `torchrun scripts/distill.sh` runs it with python, which reads only the last line
# Knowledge distillation: bash scripts/distill.sh [CONF] --export-kd-teacher-load T [--export-kd-cfg Y] [--train-iters N]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
if [[ " $* ${MLM_EXTRA_ARGS:-} " != *" --export-kd-teacher-load"* ]] && [[ " $* " != *" -h "* && " $* " != *" --help "* ]]; then
  [ "${RANK:-0}" = 0 ] && echo "error: distill.sh needs --export-kd-teacher-load (the teacher's dist checkpoint or HF directory)" >&2
  exit 2
fi
pt_launch post_training.cli.train "$@"
exit
":"""
import os, sys; os.execvp("bash", ["bash", *sys.argv])  # under torchrun: each rank runs the bash above
