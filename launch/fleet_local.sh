#!/usr/bin/env bash
# The fleet recipe on one machine: N control processes (sim robots) and one learner over loopback with CURVE keys,
# each started exactly as on its own machine (fleet_keys.sh, fleet_learner.sh, fleet_robot.sh). The last robot
# joins LATE_S seconds after the others. When every robot is done the learner is stopped (it drains), then one line
# per robot is printed from the learner's and the robots' summaries; exit 1 if a robot failed or lost anything.
#   bash launch/fleet_local.sh session.episodes=3            (overrides go to every process)
# Env: N (4), OUT (outputs/fleet_local_<time>), LATE_S (0), TRANSITIONS_PORT / WEIGHTS_PORT (5555 / 5556).
set -uo pipefail
cd "$(dirname "$0")/.."
N=${N:-4}
OUT=${OUT:-outputs/fleet_local_$(date +%Y%m%d_%H%M%S)}
export TRANSITIONS_PORT=${TRANSITIONS_PORT:-5555} WEIGHTS_PORT=${WEIGHTS_PORT:-5556}
mkdir -p "$OUT"
bash launch/fleet_keys.sh "$N" "$OUT/keys" >/dev/null || exit 1

BIND=127.0.0.1 KEYS="$OUT/keys/learner" RUN_DIR="$OUT/learner" bash launch/fleet_learner.sh "$@" \
  >"$OUT/learner.log" 2>&1 &
learner=$!
pids=()
for ((k = 0; k < N; k++)); do
  if ((k == N - 1)) && [ "${LATE_S:-0}" != 0 ]; then sleep "$LATE_S"; fi
  LEARNER_HOST=127.0.0.1 ROBOT_INDEX=$k KEYS="$OUT/keys/robot$k" RUN_DIR="$OUT/robot$k" \
    bash launch/fleet_robot.sh "$@" >"$OUT/robot$k.log" 2>&1 &
  pids+=($!)
done
fail=0
for ((k = 0; k < N; k++)); do
  wait "${pids[$k]}"; code=$?
  if ((code != 0)); then echo "robot$k exited with $code (see $OUT/robot$k.log)" >&2; fail=1; fi
done
kill -INT "$learner"
wait "$learner"; code=$?
if ((code != 0)); then echo "learner exited with $code (see $OUT/learner.log)" >&2; fail=1; fi

"${PYTHON:-.venv/bin/python}" - "$OUT" "$N" <<'PY' || fail=1
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
learner = json.loads((out / "learner/learner/summary.json").read_text())
bad = 0
print(f"learner: {learner['replay_rows']} transitions stored, {learner['updates']} updates, weights "
      f"v{learner['weight_version']}, ack p99 {learner['ack_latency_ms']['ack_p99_ms']:.1f} ms")
for k in range(n):
    name = f"robot{k}"
    c = json.loads((out / name / "control/summary.json").read_text())
    r = learner["robots"].get(name, {})
    sent = int(c["transitions"].get("stream_sent", 0))
    lost = sent - int(c["transitions"].get("unacked_at_exit", 0)) - r.get("stored", 0) - r.get("quarantined", 0)
    rate = r.get("rate_hz")
    print(f"{name}: seed {c['seed']}, {c['episodes']} episodes, success {c.get('success_rate')}, sent {sent}, "
          f"stored {r.get('stored')}, lost {lost}, {rate or 0:.1f} Hz, ack p99 {r.get('ack_p99_ms') or 0:.1f} ms, "
          f"streams {r.get('streams')}, weights v{c.get('final_policy_version')}")
    bad += lost != 0 or not r
sys.exit(1 if bad else 0)
PY
exit $fail
