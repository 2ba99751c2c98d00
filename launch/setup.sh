#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with robot_rl and its pinned dependency set.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "robot_rl needs Python 3.11 (lerobot 0.4.4 is the newest lerobot for 3.11); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

# Offscreen MuJoCo rendering without a GPU uses Mesa's EGL; install it when we can (root on Debian/Ubuntu).
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1 libgles2 >/dev/null
  else
    echo "note: libEGL not found; camera observations need it (apt-get install libegl1 libgl1)" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip check
echo "robot_rl installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
