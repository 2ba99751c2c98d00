import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ports():
    return free_port(), free_port()


def robot_rl_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed CLI exactly as a user would (a separate process)."""
    return subprocess.run([sys.executable, "-m", "robot_rl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
