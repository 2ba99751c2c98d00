#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the main job — a sim session on CPU where a control process
# drives a MuJoCo Panda (robosuite Lift) at 20 Hz while a separate learner process trains on its transitions
# over ZMQ and pushes weights back. Extra arguments are hydra overrides, e.g. session.episodes=10.
#
# Exit 0 only when the session closed the loop: its own exit code is 0 (nothing lost, every transition
# acknowledged, every process ended cleanly) AND the robot loaded learner weights and the policy drove with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
RUN=outputs/quickstart
.venv/bin/robot-rl session hydra.run.dir="$RUN" "$@"
.venv/bin/python - "$RUN/summary.json" <<'PY'
import json, sys

s = json.load(open(sys.argv[1]))
t = s["transitions"]
problems = []
if not s.get("weights_loaded"):
    problems.append("the robot never loaded learner weights (the learner published none in time: more "
                    "session.episodes, or a faster learner)")
if not s.get("policy_steps"):
    problems.append("the policy never drove the robot")
if t["unacknowledged"] or t["sent"] != t["stored"]:
    problems.append(f"transitions: {t['sent']} sent, {t['stored']} stored, {t['unacknowledged']} unacknowledged")
if problems:
    print("quickstart FAILED: " + "; ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"quickstart ok: the robot ran learner weights v{s['final_policy_version']} for {s['policy_steps']} policy "
      f"steps; {t['sent']} transitions sent, all stored and acknowledged")
PY
