"""`python -m robot_rl.learner CONFIG RUN_DIR`: the learner process of a session (the session verb starts it).

Signals: SIGINT and SIGTERM are caught from the first instruction (also when the process started with SIGINT
ignored, as a background job does); one that arrives while the learner is still being built is delivered again
once the learner's own handler is installed, so it stops cleanly instead of dying mid-start. Started by a session
(ROBOT_RL_PARENT_PID), it also stops on its own when that parent dies (SIGTERM to itself).
"""

import os
import signal
import sys
import threading

PARENT_PID_ENV = "ROBOT_RL_PARENT_PID"
_early: list[int] = []


def _remember(signum, _frame) -> None:
    _early.append(signum)


def _watch(parent: int | None) -> None:
    """Re-deliver an early stop signal once the learner installed its handler; SIGTERM itself if the parent dies."""
    redelivered = False
    while True:
        if _early and not redelivered and signal.getsignal(signal.SIGTERM) is not _remember:
            redelivered = True
            os.kill(os.getpid(), signal.SIGTERM)
        if parent is not None and os.getppid() != parent:
            parent = None
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(0.2)


def _parent() -> int | None:
    try:
        pid = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return None
    return pid if os.getppid() == pid else None


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m robot_rl.learner <resolved config.yaml> <run dir>")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _remember)
    threading.Thread(target=_watch, args=(_parent(),), name="signal-watch", daemon=True).start()
    from robot_rl.learner.process import main

    code = main(sys.argv[1], sys.argv[2])
    # done: a late stop signal must not turn a clean exit into death by signal (interpreter shutdown puts the
    # default action back for caught signals, not for ignored ones)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
