#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with robot_rl and its pinned dependency set
# (Python 3.12, lerobot 0.6.1). Idempotent and quick when everything is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

is_py312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

# Python 3.12: $PYTHON, then python3.12 on PATH, then pyenv's versions directory.
PY=""
if [ -n "${PYTHON:-}" ]; then
  if ! is_py312 "$PYTHON"; then
    echo "PYTHON=$PYTHON is not a Python 3.12 interpreter (robot_rl needs 3.12: lerobot >= 0.5 requires it)" >&2
    exit 1
  fi
  PY=$PYTHON
elif [ -x .venv/bin/python ] && is_py312 .venv/bin/python; then
  PY=.venv/bin/python
elif command -v python3.12 >/dev/null && is_py312 "$(command -v python3.12)"; then
  PY=$(command -v python3.12)
else
  for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12; do
    if is_py312 "$cand"; then PY=$cand; fi   # the glob sorts, so the last one is the newest 3.12.x
  done
fi
if [ -z "$PY" ]; then
  cat >&2 <<'MSG'
robot_rl needs Python 3.12 (lerobot 0.6 requires Python >= 3.12), and none was found
(looked at $PYTHON, python3.12 on PATH, ~/.pyenv/versions/3.12.*). Install one, then re-run:
  Ubuntu 24.04 / Debian 13:          sudo apt-get install python3.12 python3.12-venv
  any Linux, through pyenv:          pyenv install 3.12   (or: uv python install 3.12)
  or point at an existing one:       PYTHON=/path/to/python3.12 bash launch/setup.sh
MSG
  exit 1
fi

# An existing .venv on another Python (e.g. the 3.11 / lerobot 0.4.4 set) is rebuilt, not patched.
if [ -x .venv/bin/python ] && ! is_py312 .venv/bin/python; then
  echo "setup: .venv is $(.venv/bin/python -V 2>&1), not 3.12: rebuilding it" >&2
  rm -rf .venv
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
# Fast path: the installed set already satisfies pyproject.toml (same file hash as the last install) -> skip pip.
stamp=.venv/.robot_rl_installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && .venv/bin/python -c 'import importlib.metadata as m; m.version("robot_rl"); import lerobot' 2>/dev/null; then
  echo "robot_rl already installed in .venv (pyproject.toml unchanged)"
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip check
echo "$want" > "$stamp"
echo "robot_rl installed in .venv ($(.venv/bin/python -V), $(.venv/bin/python -c 'import torch, lerobot; print("lerobot", lerobot.__version__, "torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
