#!/usr/bin/env bash
# A fleet, learner side: N robots (N machines, launch/fleet_robot.sh) feed this one learner. It binds a network
# address, so CURVE keys are required (launch/fleet_keys.sh). Give it the same algo/policy/robot overrides as the
# robots (they build the robot-side policy from them):
#   bash launch/fleet_learner.sh algo=online_bc policy=mlp
# Env: KEYS (keys/fleet/learner), BIND (0.0.0.0), TRANSITIONS_PORT / WEIGHTS_PORT (5555 / 5556),
#      RUN_DIR (outputs/fleet_learner_<time>). Ctrl-C (SIGINT/SIGTERM) drains and writes <RUN_DIR>/learner/summary.json
#      with a `robots` entry per robot (rates, streams, ack latency, health); metrics.jsonl has the same per interval.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-keys/fleet/learner}
BIND=${BIND:-0.0.0.0}
exec "${ROBOT_RL:-.venv/bin/robot-rl}" learner session.learner=remote session.curve_keys_dir="$KEYS" \
  session.endpoints.bind_transitions="tcp://$BIND:${TRANSITIONS_PORT:-5555}" \
  session.endpoints.bind_weights="tcp://$BIND:${WEIGHTS_PORT:-5556}" \
  hydra.run.dir="${RUN_DIR:-outputs/fleet_learner_$(date +%Y%m%d_%H%M%S)}" "$@"
