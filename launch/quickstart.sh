#!/usr/bin/env bash
# One command on a fresh machine: set up, then run the main job — a sim session on CPU where a control process
# drives a MuJoCo Panda (robosuite Lift) at 20 Hz while a separate learner process trains on its transitions
# over ZMQ and pushes weights back. Extra arguments are hydra overrides, e.g. session.episodes=10.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/robot-rl session hydra.run.dir=outputs/quickstart "$@"
