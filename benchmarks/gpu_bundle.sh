#!/usr/bin/env bash
# Everything benchmarks/gpu_check.sh needs on a GPU machine that has Python 3.12 + torch but no network and none of
# our other dependencies: wheels of the pinned versions this venv runs, robosuite pruned to the Panda assets the
# benchmarks use (its full wheel is 152 MB), robot_rl's own wheel, and optionally a diffusion checkpoint for the
# RL-100 round and the residual session. From the repository root, on a machine with PyPI:
#   bash benchmarks/gpu_bundle.sh [BUNDLE=.whl] [BASE=<diffusion checkpoint dir>]      (about 55 MB)
# On the GPU machine, from a copy of the repository with the bundle beside it:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   tar xzf .whl/robosuite_pruned.tgz -C /tmp/site
#   export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH MUJOCO_GL=disable    # egl only where libEGL is installed
#   OUT=/tmp/gc RL100_POLICY=$PWD/.whl/base PYTHON=python3 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-.whl}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
# not in a CUDA image of Python 3.12 + torch (its usual numpy/scipy/numba/matplotlib/safetensors are assumed there)
PACKAGES="mujoco robosuite zarr numcodecs donfig google-crc32c msgspec pyzmq hydra-core omegaconf diffusers
  importlib_metadata termcolor glfw PyOpenGL"
mkdir -p "$BUNDLE"
pins=()
for p in $PACKAGES; do pins+=("$p==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")"); done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$BUNDLE" "${pins[@]}"
"$PY" -m pip wheel -q --no-deps -w "$BUNDLE" "antlr4-python3-runtime==$("$PY" -c \
  "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")"  # sdist only on PyPI

# robosuite without the other robots', grippers' and mounts' meshes (and pybullet's IK data)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unzip -q "$BUNDLE"/robosuite-*.whl 'robosuite/*' -d "$work"
rm "$BUNDLE"/robosuite-*.whl
assets="$work/robosuite/models/assets"
rm -rf "$assets/bullet_data"
for d in "$assets"/robots/*/; do [ "$(basename "$d")" = panda ] || rm -rf "$d/meshes" "$d/obj_meshes"; done
for d in "$assets"/grippers/meshes/* "$assets"/grippers/obj_meshes/*; do [[ $(basename "$d") == *panda* ]] || rm -rf "$d"; done
for d in "$assets"/bases/meshes/*; do [[ $(basename "$d") == *rethink* ]] || rm -rf "$d"; done
tar czf "$BUNDLE/robosuite_pruned.tgz" -C "$work" robosuite

rm -f "$BUNDLE"/robot_rl-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUNDLE" .
if [ -n "${BASE:-}" ]; then  # the policy weights and manifest only: no optimiser state
  mkdir -p "$BUNDLE/base"
  cp "$BASE"/{config.yaml,manifest.json,policy.safetensors} "$BUNDLE/base/"
fi
du -sh "$BUNDLE"
