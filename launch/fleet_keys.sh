#!/usr/bin/env bash
# CURVE keys for a fleet: one learner key pair and one key pair per robot, each robot authorised on the learner
# (revoke one by deleting learner/authorized_clients/robot<k>.key). Refuses to overwrite existing keys.
#   bash launch/fleet_keys.sh 4 keys/fleet
# then: keys/fleet/learner/  stays on the learner machine; copy keys/fleet/robot<k>/ to robot k (its secret key
# never leaves it otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: fleet_keys.sh <number of robots> [directory]}
DIR=${2:-keys/fleet}
"${PYTHON:-.venv/bin/python}" -c '
import sys
from robot_rl.transport.security import fleet_keys
for role, path in fleet_keys(sys.argv[2], int(sys.argv[1])).items():
    print(f"{role:8s} {path}")
' "$N" "$DIR"
