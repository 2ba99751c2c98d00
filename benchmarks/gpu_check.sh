#!/usr/bin/env bash
# The GPU checks (issue 14's, and issue 15's wall clock per RL-100 round) as one short script, about 5-9 minutes on
# a CUDA machine. From the repository root:
#   bash benchmarks/gpu_check.sh            (OUT=outputs/gpu_check, PYTHON=.venv/bin/python or python3)
# On a GPU machine without network or our dependencies, bring benchmarks/gpu_bundle.sh's bundle (its header says how).
# 1. a short sim session with the learner on CUDA: its device, updates/s, weights on the robot, transitions lost
# 2. learner critic updates/s on the GPU: batched ensemble vs a per-head loop, widths 256 and 1024
# 3. one RL-100 round's learning stages (fit + PPO + gate): quick size on the CPU and the GPU side by side, then
#    the full size on the GPU (RL100_POLICY / RL100_DATA: a diffusion checkpoint and stores, else made in place)
# 4. robot-rl train (diffusion policy) samples/s on 1 GPU vs torchrun on every GPU (NCCL) at the same global batch,
#    loss curves overlaid ($OUT/bench_torchrun_gpu.png)
# 5. a residual-RL session (algo=residual) with the learner on CUDA, on that base and step 3's expert store
# Every step has its own timeout and the script goes on after a failure; the last lines say what passed.
# STEPS="session_cuda rl100_round_full" runs only the steps named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -x .venv/bin/robot-rl ]; then RRL=(.venv/bin/robot-rl); else RRL=("$PY" -m robot_rl.cli); fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} MUJOCO_GL=${MUJOCO_GL:-egl}
status=()
step() {  # step <name> <timeout s> <command...>: run, keep its output, record pass/fail
  local name=$1 limit=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  echo "== $name"
  if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"; then status+=("$name: ok"); else status+=("$name: FAILED (see $OUT/$name.txt)"); fi
}

nvidia-smi -L || { echo "no GPU visible: nothing to check" >&2; exit 1; }
"$PY" -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || exit 1

rm -rf "$OUT/session"
step session_cuda 100 "${RRL[@]}" session device=cuda session.episodes=6 session.expert_episodes=2 \
  session.max_episode_steps=100 tensorboard=false hydra.run.dir="$OUT/session"
on_cuda() {  # on_cuda <session run dir>: the learner's summary says it ran on CUDA and trained
  [ -f "$1/summary.json" ] || return 0  # the step did not run
  "$PY" - "$1" <<'PY' || status+=("$1: the learner did not run on CUDA")
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
top, learner = json.loads((run / "summary.json").read_text()), json.loads((run / "learner/summary.json").read_text())
print(f"session: status {top.get('status')}, learner device {learner['device']}, {learner['updates']} updates "
      f"({learner['updates_per_s'] or 0:.1f}/s), achieved UTD {learner['achieved_utd']}, weights loaded "
      f"{top.get('weights_loaded')}, transitions {top.get('transitions')}")
assert learner["device"].startswith("cuda"), "the learner did not run on CUDA"
PY
}
on_cuda "$OUT/session"
step learner_throughput 60 "$PY" benchmarks/bench_learner_throughput.py --device cuda --widths 256,256 1024,1024 \
  --repeats 3 --block-s 1.0
ROUND=(--mixed 5 --out "$OUT/rl100_round")
[ -n "${RL100_POLICY:-}" ] && ROUND+=(--policy "$RL100_POLICY")
[ -n "${RL100_DATA:-}" ] && ROUND+=(--data $RL100_DATA)
step rl100_round_quick 150 "$PY" benchmarks/bench_rl100_round.py --size quick --devices cpu,cuda "${ROUND[@]}"
step rl100_round_full 150 "$PY" benchmarks/bench_rl100_round.py --size full --devices cuda "${ROUND[@]}"
EXPERT="$OUT/rl100_round/mixed/mixed_expert"
if [ -n "${RL100_POLICY:-}" ] && [ -d "$EXPERT" ]; then
  rm -rf "$OUT/residual"
  step session_residual_cuda 100 "${RRL[@]}" session algo=residual algo.base_checkpoint="$RL100_POLICY" \
    algo.demos="$EXPERT" algo.learning_starts=200 algo.critic_warmup=50 session.episodes=5 \
    session.max_episode_steps=100 session.eval_every_episodes=0 device=cuda tensorboard=false hydra.run.dir="$OUT/residual"
  on_cuda "$OUT/residual"
fi
step train_torchrun 90 "$PY" benchmarks/bench_torchrun.py --device cuda --steps 300 --batch 256 --repeats 1 \
  --down-dims 256 512 1024 --work "$OUT/torchrun" --figure "$OUT/bench_torchrun_gpu.png"
echo "== results"
printf '%s\n' "${status[@]}"
