"""Soak: short Lift sessions (online BC) under faults at random moments, on a machine kept busy, checked after each.

    .venv/bin/python benchmarks/soak_session.py --n 2            # each scenario twice
    .venv/bin/python benchmarks/soak_session.py --n 10 --scenarios control-kill,ctrl-c --seed 3

Scenarios (each at a seeded random moment once the robot streams):
    learner-kill   SIGKILL the learner; the session restarts it from its checkpoint and replay
    control-kill   SIGKILL the control process; the session restarts it (--resume): outbox resend, exactly once
    sigstop        freeze the learner for 3 s (SIGSTOP/SIGCONT): one watchdog outage of ~3 s, nothing lost
    ctrl-c         SIGINT to the session's process alone: robot safe at the next tick, drain, exit in seconds
    disk-full      the run dir on a small tmpfs (private mount namespace; skipped where mounting is not allowed):
                   the session stops early (exit 28) with the robot safe and a summary; what was acknowledged is
                   stored
Meanwhile `--load` processes (default 2) run a numpy busy loop, so both cores are busy.

Checks after each run: every transition the robot produced is stored exactly once (the control's stream seqs vs the
learner replay's (sender, stream, seq); for the disk, every one acknowledged before the fault), and the top of
summary.json is true (sent/stored/unacknowledged agree with the replay and the control, episodes of the control log
and the replay agree, the exit code matches the status). Prints one table: scenario x passed/failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from robot_rl.control.telemetry import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("learner-kill", "control-kill", "sigstop", "ctrl-c", "disk-full")
BASE = [
    "session.episodes=8",
    "session.expert_episodes=1",
    "session.max_episode_steps=40",
    "session.rate_hz=20",
    "session.stop_on_success=false",
    "session.restart_crashed=2",
    "algo.min_transitions=40",
    "algo.publish_every_updates=20",
    "algo.batch_size=64",
    "policy.hidden=[64,64]",
    "device=cpu",
    "tensorboard=false",
    "session.watchdog_s=0.5",
    "session.heartbeat_s=0.02",
]
BUSY = "import numpy as np\na = np.random.rand(300, 300)\nwhile True:\n    a = a @ a; a /= np.abs(a).max() + 1e-9\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the learner may run helper processes, e.g. its ingest)."""
    out = [pid]
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        out += tree(int(child))
    return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def can_mount(tmp: Path) -> list[str] | None:
    """The unshare prefix that lets us mount a tmpfs, or None."""
    if shutil.which("unshare") is None:
        return None
    probe = tmp / "probe"
    probe.mkdir(exist_ok=True)
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        r = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m none {probe}"], capture_output=True)
        if r.returncode == 0:
            return prefix
    return None


# ----------------------------------------------------------------------------------------------- one run
class Run:
    def __init__(self, scenario: str, index: int, root: Path, rng: random.Random, unshare: list[str] | None):
        self.scenario, self.index, self.rng = scenario, index, rng
        self.dir = root / f"{scenario}_{index}"
        self.run = self.dir / "run"
        self.kept = self.dir / "kept"  # disk-full: the run dir copied out of the tmpfs
        self.log = self.dir / "session.log"
        self.unshare = unshare
        self.notes: list[str] = []
        self.fault_t: float | None = None
        self.exit_t: float | None = None

    def command(self) -> list[str]:
        ports = [f"session.transitions_port={free_port()}", f"session.weights_port={free_port()}"]
        args = [sys.executable, "-m", "robot_rl.cli", "session", *BASE, *ports, f"hydra.run.dir={self.run}"]
        if self.scenario != "disk-full":
            return args
        size_kb = self.rng.randint(2500, 4500)  # the disk fills at a random moment
        args += ["session.episodes=400", "session.space_reserve_mb=1"]
        script = (
            f'mount -t tmpfs -o size={size_kb}k none {self.run} && "$@"; code=$?; '
            f"cp -a {self.run}/. {self.kept}/; exit $code"
        )
        return [*self.unshare, "sh", "-c", script, "sh", *args]

    def execute(self) -> tuple[bool, list[str]]:
        self.dir.mkdir(parents=True)
        self.run.mkdir()
        self.kept.mkdir()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with self.log.open("w") as out:
            proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )
            try:
                self.inject(proc)
                proc.wait(600)
            except subprocess.TimeoutExpired:
                self.notes.append("session did not exit within 600 s: killed")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            finally:
                for pid in pids(f"robot_rl.(control|learner) .*{self.run}"):  # never leave a child behind
                    self.notes.append(f"child {pid} still running after the session: killed")
                    os.kill(pid, signal.SIGKILL)
        self.exit_t = time.time()
        self.code = proc.returncode
        return self.check()

    # -- faults
    def inject(self, proc: subprocess.Popen) -> None:
        if self.scenario == "disk-full":
            return  # the disk fills by itself, at a moment set by the tmpfs size
        started = self.run / "control" / "episode_started.json"
        deadline = time.time() + 240
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        delay = self.rng.uniform(1.0, 10.0)
        end = time.time() + delay
        while time.time() < end and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None:
            self.notes.append("session ended before the fault")
            return
        self.fault_t = time.time()
        if self.scenario == "ctrl-c":
            os.kill(proc.pid, signal.SIGINT)
            return
        target = "learner" if self.scenario in ("learner-kill", "sigstop") else "control"
        found = pids(f"robot_rl.{target} .*{self.run}")
        if not found:
            self.notes.append(f"no {target} process to fault")
            return
        if self.scenario == "sigstop":  # the whole learner: its helper processes too
            frozen = tree(found[0])
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(3.0)
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        else:
            os.kill(found[0], signal.SIGKILL)
        self.notes.append(f"fault after {delay:.1f} s of streaming")

    # -- checks
    def check(self) -> tuple[bool, list[str]]:
        run = self.kept if self.scenario == "disk-full" else self.run
        problems: list[str] = []
        summary = read_json(run / "summary.json")
        if summary is None:
            return False, [*self.notes, f"no summary.json (exit code {self.code})"]
        expect_ok = self.scenario != "disk-full"
        # exit code and status agree, and are what the scenario should give
        if (summary.get("exit_code") != self.code) or ((self.code == 0) != (summary.get("status") == "ok")):
            problems.append(
                f"exit code {self.code} vs summary exit_code {summary.get('exit_code')} / status "
                f"{summary.get('status')}"
            )
        if expect_ok and self.code != 0:
            problems.append(f"exit code {self.code}: {summary.get('problems')}")
        if not expect_ok:
            if self.code != 28 or not summary.get("disk_full"):
                problems.append(f"disk-full: exit code {self.code}, disk_full {summary.get('disk_full')}")
            leftovers = [
                str(p.relative_to(run))
                for p in run.rglob("*")
                if p.name.endswith(".tmp") or (p.suffix == ".png" and p.stat().st_size == 0)
            ]
            if leftovers:
                problems.append(f"half-written files left: {leftovers}")
            if "Traceback" in self.log.read_text():
                problems.append("a traceback in the output")
        control = summary.get("control") or {}
        t = control.get("transitions") or {}
        sent, acked = t.get("stream_sent"), t.get("stream_acked")
        learner = summary.get("learner") or {}
        top = summary.get("transitions") or {}
        if sent is None:
            problems.append("the control summary has no stream counts")
        elif top.get("sent") != sent:
            problems.append(f"top-level sent {top.get('sent')} != control's stream {sent}")
        # the replay: (sender, stream, seq) exactly once
        seqs = replay_seqs(run / "learner" / "replay.zarr")
        if seqs is None:
            problems.append("no replay")
        elif sent is not None:
            keys = list(seqs)
            all_seqs = sorted(s for k in keys for s in seqs[k])
            if len(keys) > 1:
                problems.append(f"{len(keys)} streams in the replay for one control process: {keys}")
            if len(all_seqs) != len(set(all_seqs)):
                problems.append(f"{len(all_seqs) - len(set(all_seqs))} duplicate (sender, stream, seq)")
            stored = set(all_seqs)
            if expect_ok:
                if stored != set(range(sent)):
                    missing = sorted(set(range(sent)) - stored)
                    problems.append(
                        f"replay holds {len(stored)} of {sent} seqs (missing {missing[:5]}..., extra "
                        f"{sorted(stored - set(range(sent)))[:5]})"
                    )
            else:
                on_disk_or_log = int(((learner.get("senders") or {}).get("robot0") or {}).get("transitions", 0))
                if on_disk_or_log < (acked or 0):
                    problems.append(f"only {on_disk_or_log} stored of {acked} acknowledged")
                if not stored <= set(range(acked or 0)) | set(range(on_disk_or_log)):
                    problems.append("the replay holds seqs never acknowledged nor counted")
            if expect_ok and top.get("stored") != len(all_seqs):
                problems.append(f"top-level stored {top.get('stored')} != replay {len(all_seqs)}")
            # episodes of the control log vs the replay
            log_eps = {int(e["episode"]) for e in read_jsonl(run / "control" / "episodes.jsonl")}
            replay_eps = replay_episode_set(run / "learner" / "replay.zarr")
            if expect_ok and log_eps != replay_eps:
                problems.append(
                    f"episodes differ: log only {sorted(log_eps - replay_eps)}, replay only "
                    f"{sorted(replay_eps - log_eps)}"
                )
            if expect_ok and not (summary.get("episodes_logged") or {}).get("agree"):
                problems.append("summary says the episodes do not agree")
        if expect_ok and top.get("unacknowledged") != 0:
            problems.append(f"{top.get('unacknowledged')} unacknowledged")
        # scenario specifics
        restarts = summary.get("restarts") or {}
        if self.scenario == "learner-kill" and self.fault_t and restarts.get("learner") != 1:
            problems.append(f"restarts {restarts}, expected the learner once")
        if self.scenario == "control-kill" and self.fault_t:
            if restarts.get("robot0") != 1:
                problems.append(f"restarts {restarts}, expected the control process once")
            e = summary.get("episodes_logged") or {}
            self.notes.append(
                f"episodes: log {e.get('control_logs')} / replay {e.get('replay')} "
                f"({e.get('interrupted')} interrupted by the kill)"
            )
        if self.scenario == "disk-full":
            self.notes.append(
                f"stopped early after {sent} transitions: {acked} acknowledged, "
                f"{top.get('stored')} stored, {top.get('unacknowledged')} kept in the outbox"
            )
        if self.scenario == "sigstop" and self.fault_t:
            o = summary.get("watchdog_outages") or {}
            self.notes.append(f"outages {o.get('count')}, longest {o.get('longest_s')} s")
            if not o.get("count") or float(o.get("longest_s") or 0) < 2.0:
                problems.append(f"the 3 s freeze is not reported as an outage: {o}")
        if self.scenario == "ctrl-c" and self.fault_t:
            import numpy as np

            ticks = np.load(run / "control" / "ticks.npz")
            after = np.flatnonzero(ticks["t"] > self.fault_t)
            if len(after) > 2 or (len(after) and not ticks["forced_safe"][after[-1]]):
                problems.append(f"{len(after)} ticks after SIGINT (robot not stopped at the next tick)")
            self.notes.append(f"exit {self.exit_t - self.fault_t:.1f} s after SIGINT")
            if summary.get("interrupted") != "SIGINT":
                problems.append(f"interrupted = {summary.get('interrupted')}")
        return not problems, [*self.notes, *problems]


def _replay_columns(path: Path, keys: tuple[str, ...]):
    commit = read_json(path / "commit.json")
    if commit is None:
        return None, None
    import numpy as np
    import zarr

    n = int(commit["rows"])
    if n == 0:
        return commit, {k: np.zeros(0, dtype=np.int64) for k in keys}
    group = zarr.open_group(zarr.storage.LocalStore(str(path)), mode="r")
    return commit, {k: np.asarray(group[k][:n]) if k in group else np.zeros(n, dtype=np.int64) for k in keys}


def replay_seqs(path: Path) -> dict[tuple, list[int]] | None:
    """{(sender, stream): seqs} of the committed replay."""
    commit, cols = _replay_columns(path, ("_sender", "_stream", "_seq"))
    if commit is None:
        return None
    streams = commit.get("streams") or [0]
    out: dict[tuple, list[int]] = {}
    for snd, stm, seq in zip(cols["_sender"], cols["_stream"], cols["_seq"]):
        out.setdefault((commit["senders"][int(snd)], streams[int(stm)]), []).append(int(seq))
    return out


def replay_episode_set(path: Path) -> set[int]:
    commit, cols = _replay_columns(path, ("episode",))
    return set() if commit is None else {int(e) for e in set(cols["episode"].tolist())}


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10, help="runs per scenario")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes running meanwhile")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="soak_session_"))
    unshare = can_mount(root)
    load = [
        subprocess.Popen([sys.executable, "-c", BUSY], env=dict(os.environ, OMP_NUM_THREADS="1"))
        for _ in range(args.load)
    ]
    results: dict[str, list[tuple[bool | None, list[str]]]] = {s: [] for s in scenarios}
    try:
        for i in range(args.n):
            for scenario in scenarios:
                if scenario == "disk-full" and unshare is None:
                    results[scenario].append((None, ["skipped: mounting a tmpfs is not permitted here"]))
                    continue
                t0 = time.time()
                ok, notes = Run(scenario, i, root, random.Random(rng.random()), unshare).execute()
                results[scenario].append((ok, notes))
                print(
                    f"[{scenario} #{i}] {'PASS' if ok else 'FAIL'} in {time.time() - t0:.0f} s: {'; '.join(notes)}",
                    flush=True,
                )
    finally:
        for p in load:
            p.kill()
            p.wait()
    print(f"\n{'scenario':<14} {'passed':>6} {'failed':>6} {'skipped':>7}")
    failed = 0
    for scenario, rows in results.items():
        n_pass = sum(ok is True for ok, _ in rows)
        n_fail = sum(ok is False for ok, _ in rows)
        failed += n_fail
        print(f"{scenario:<14} {n_pass:>6} {n_fail:>6} {sum(ok is None for ok, _ in rows):>7}")
        for ok, notes in rows:
            if ok is False:
                print(f"    FAIL: {'; '.join(notes)}")
    print(f"(runs under {root}{'' if args.keep or failed else ', removed'})")
    if not args.keep and not failed:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
