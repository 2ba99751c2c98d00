#!/usr/bin/env bash
# Two-machine session, GPU side. The learner binds a network address, so CURVE keys are required:
#   1. once, on this machine:  .venv/bin/robot-rl keys keys/      (creates server + client key pairs)
#   2. copy keys/client.key_secret, keys/client.key and keys/server.key (public only) to the robot machine
#   3. run this script; then launch/robot_machine.sh on the robot machine with LEARNER_HOST set to this host.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-keys}
.venv/bin/robot-rl learner session.learner=remote session.curve_keys_dir="$KEYS" \
  session.endpoints.bind_transitions=tcp://0.0.0.0:5555 session.endpoints.bind_weights=tcp://0.0.0.0:5556 \
  hydra.run.dir=outputs/learner_$(date +%Y%m%d_%H%M%S) "$@"
