"""`python -m robot_rl.control CONFIG RUN_DIR [SENDER_ID]`: one control process (the session verb starts it)."""

import sys

from robot_rl.control.process import main

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5, 6):
        sys.exit("usage: python -m robot_rl.control <resolved config.yaml> <run dir> [sender id [robot index [--resume]]]")
    sys.exit(main(*sys.argv[1:]))
