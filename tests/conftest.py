import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ports():
    return free_port(), free_port()


def robot_rl_cli(*args: str, timeout: float = 300, threads: int | None = None) -> subprocess.CompletedProcess:
    """Run the installed CLI exactly as a user would (a separate process); `threads` sets its OMP_NUM_THREADS."""
    env = None if threads is None else dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run(
        [sys.executable, "-m", "robot_rl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a whole module (its module-scoped trainings included), restored after it: small
    models train faster and reproducibly so, and tests running side by side do not fight over the cores. A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lift_base(one_thread, tmp_path_factory):
    """Three scripted Lift demos (`demos/`) and a tiny diffusion base trained on them for a few steps (`base/`)."""
    from builders import base_from_demos

    return base_from_demos(tmp_path_factory.mktemp("lift_base"), "train.steps=20", "train.warmup_steps=2")


@pytest.fixture
def tmpfs(tmp_path):
    """A real small filesystem to fill (`tmpfs("600k")` -> its mount point), unmounted afterwards; skips the test
    where mounting is not permitted (not root)."""
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if res.returncode != 0:
            pytest.skip("needs permission to mount a tmpfs (root) to fill a real disk")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)
