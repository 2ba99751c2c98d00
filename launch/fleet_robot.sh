#!/usr/bin/env bash
# A fleet, robot side: robot ROBOT_INDEX (0..N-1) connects to the learner at LEARNER_HOST with its own keys, sender
# id robot<k> and episode seeds (seed + 100003 x k). Robots may join late, stop or restart: the others go on.
#   LEARNER_HOST=10.0.0.5 ROBOT_INDEX=2 bash launch/fleet_robot.sh algo=online_bc policy=mlp robot=so101 ...
# Env: KEYS (keys/fleet/robot<k>), TRANSITIONS_PORT / WEIGHTS_PORT (5555 / 5556), RUN_DIR (outputs/fleet_robot<k>_<time>).
# A restart that should resend what was not acknowledged: the same RUN_DIR and session.resume=true.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LEARNER_HOST:?set LEARNER_HOST to the learner machine's address}"
: "${ROBOT_INDEX:?set ROBOT_INDEX to this robot's number in the fleet (0..N-1)}"
KEYS=${KEYS:-keys/fleet/robot$ROBOT_INDEX}
exec "${ROBOT_RL:-.venv/bin/robot-rl}" control session.learner=remote session.host="$LEARNER_HOST" \
  session.transitions_port="${TRANSITIONS_PORT:-5555}" session.weights_port="${WEIGHTS_PORT:-5556}" \
  session.curve_keys_dir="$KEYS" session.sender_id="robot$ROBOT_INDEX" session.robot_index="$ROBOT_INDEX" \
  hydra.run.dir="${RUN_DIR:-outputs/fleet_robot${ROBOT_INDEX}_$(date +%Y%m%d_%H%M%S)}" "$@"
