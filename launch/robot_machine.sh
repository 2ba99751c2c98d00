#!/usr/bin/env bash
# Two-machine session, robot side: the control process connects to a remote learner (see learner_machine.sh).
# Example for a real SO-101 with a leader arm:  LEARNER_HOST=10.0.0.5 bash launch/robot_machine.sh robot=so101 teleop=so101_leader
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LEARNER_HOST:?set LEARNER_HOST to the learner machine's address}"
KEYS=${KEYS:-keys}
.venv/bin/robot-rl control session.learner=remote session.host="$LEARNER_HOST" session.curve_keys_dir="$KEYS" \
  session.sender_id="$(hostname)" hydra.run.dir=outputs/control_$(date +%Y%m%d_%H%M%S) "$@"
