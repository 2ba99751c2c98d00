"""`python -m robot_rl.control CONFIG RUN_DIR [SENDER_ID]`: one control process (the session verb starts it)."""

import logging
import os
import signal
import sys

from robot_rl.control.process import STOP_SIGNALS, main

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5, 6):
        sys.exit(
            "usage: python -m robot_rl.control <resolved config.yaml> <run dir> [sender id [robot index [--resume]]]"
        )
    code = main(*sys.argv[1:])
    # done: a late stop signal must not turn a clean exit into death by signal (interpreter shutdown puts the
    # default action back for caught signals, not for ignored ones)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Everything is written and closed (summary, ticks, episode log, outbox, sockets, robot): skip the interpreter's
    # teardown of torch/MuJoCo/zmq, which takes seconds on a loaded machine while a stopping session waits for us.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
