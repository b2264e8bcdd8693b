# Shared launcher, sourced by the task scripts (scripts/generate.sh, ...).
#
#   source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
#   pt_launch post_training.cli.<task> "$@"
#
# First positional argument: model conf (default: the embedded SmolLM2-135M-Instruct).
# Environment (Megatron-LM's examples): TP PP DP HF_MODEL_CKPT MLM_MODEL_CKPT MLM_MODEL_SAVE
# MLM_EXTRA_ARGS EXPORT_DIR; multi-node: NNODES NODE_RANK MASTER_ADDR MASTER_PORT.
# Under torchrun already (RANK and LOCAL_RANK set) the Python entry runs directly. The entry
# reads the variables that stand for flags itself (see post_training/arguments.py).

PT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PT_DEFAULT_CONF="HuggingFaceTB/SmolLM2-135M-Instruct"

pt_python() {
  if [ -x "$PT_ROOT/.venv/bin/python" ]; then echo "$PT_ROOT/.venv/bin/python"; else command -v python3; fi
}

# Under a torchrun that was started by the user: TP/PP/DP from the env, an unset TP taking what
# the world size leaves (torchrun --nproc-per-node 3 scripts/x.sh == TP=3 bash scripts/x.sh);
# with TP set and DP unset, DP is derived (as Megatron-LM does). A mismatch is one error line.
pt_layout_from_world() {
  local world="${WORLD_SIZE:-1}" pp="${PP:-1}" dp="${DP:-1}" msg=""
  if [ -z "${TP:-}" ]; then
    if (( world % (pp * dp) )); then
      msg="torchrun started $world ranks, not divisible by PP*DP = $pp*$dp"
    else
      export TP=$((world / (pp * dp)))
    fi
  elif [ -n "${DP:-}" ] && (( world != TP * pp * dp )); then
    msg="torchrun started $world ranks but TP*PP*DP = $TP*$pp*$dp = $((TP * pp * dp))"
  elif (( world % (TP * pp) )); then
    msg="torchrun started $world ranks, not divisible by TP*PP = $TP*$pp"
  fi
  if [ -n "$msg" ]; then
    [ "${RANK:-0}" = 0 ] && echo "error: $msg" >&2
    return 2
  fi
}

pt_launch() {
  local module="$1"; shift
  local conf="$PT_DEFAULT_CONF"
  if [ $# -gt 0 ] && [[ "$1" != -* ]]; then conf="$1"; shift; fi
  local tp="${TP:-1}" pp="${PP:-1}" dp="${DP:-1}" nnodes="${NNODES:-1}"
  local n
  for n in "$tp" "$pp" "$dp" "$nnodes"; do
    if ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
      echo "error: TP, PP, DP and NNODES must be positive integers (TP=$tp PP=$pp DP=$dp NNODES=$nnodes)" >&2
      return 2
    fi
  done
  # TP, PP, HF_MODEL_CKPT, MLM_MODEL_CKPT, MLM_MODEL_SAVE and EXPORT_DIR are read by the entry
  # itself (post_training/arguments.py: a set variable is its flag's default; a flag wins).
  local args=(--model-conf "$conf")
  local extra=()
  read -r -a extra <<< "${MLM_EXTRA_ARGS:-}"
  args+=("${extra[@]}" "$@")
  local py; py="$(pt_python)"
  export PT_SCRIPT; PT_SCRIPT="$(basename "$0")"  # names the script in --help and usage lines
  export PYTHONPATH="$PT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

  if [ -n "${RANK:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
    pt_layout_from_world || return $?
    exec "$py" -m "$module" "${args[@]}"
  fi
  local world=$((tp * pp * dp))
  if (( world % nnodes != 0 )); then
    echo "error: TP*PP*DP=$world ranks cannot be split evenly over NNODES=$nnodes" >&2
    return 2
  fi
  if (( world == 1 && nnodes == 1 )); then
    exec "$py" -m "$module" "${args[@]}"
  fi
  # Reject bad input once, before N ranks start (torchrun would wrap the error in pages).
  "$py" -m "$module" --preflight "${args[@]}" || return $?
  exec "$py" -m torch.distributed.run \
    --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --nproc-per-node $((world / nnodes)) \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m "$module" "${args[@]}"
}
