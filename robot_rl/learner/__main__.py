"""`python -m robot_rl.learner CONFIG RUN_DIR`: the learner process of a session (the session verb starts it)."""

import sys

from robot_rl.learner.process import main

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m robot_rl.learner <resolved config.yaml> <run dir>")
    sys.exit(main(sys.argv[1], sys.argv[2]))
