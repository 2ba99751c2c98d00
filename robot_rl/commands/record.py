"""`robot-rl record`: an operator (or a scripted expert in sim) drives the robot; episodes go to an episode store.

The loop is the one rollout loop (robot_rl/rollout.py) that sessions, eval and deploy run: paced on absolute
deadlines, every action through the safety filter; `EpisodeRecording` writes each step. With a policy
configured the policy drives and the teleop takes over when it intervenes (or a simulated intervener in sim);
each step records who acted and what the policy proposed. Episodes end on the operator's save key, on
success (sim, after `success_extra_steps`), or at `max_episode_steps`; the rerecord key discards the episode and
restarts it with the same seed; the stop key saves and quits; Ctrl-C quits and drops the episode in progress.
The success key labels the step it is pressed at and every later step of the episode `success=True` (operator
labels on hardware, where the robot cannot tell; they train the success classifier, docs/rewards.md).
Disk writes happen on the store's writer thread, never in the loop.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from robot_rl.config import ConfigError, positive, write_json
from robot_rl.control.pacing import PacedLoop
from robot_rl.control.safety import build_safety
from robot_rl.control.takeover import SOURCES
from robot_rl.control.viz import make_view
from robot_rl.data.episode_store import EpisodeStore, StoreError
from robot_rl.factory import make_policy, make_robot, make_teleop
from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.rollout import Rollout

log = logging.getLogger("robot_rl.commands.record")


def step_features(robot, with_policy: bool, has_sim_state: bool) -> dict[str, Feature]:
    """What a recorded step holds: observations, the executed action, who acted, timing, task signals."""
    act = robot.action_feature
    feats = {OBS_PREFIX + k: f for k, f in robot.observation_features.items()}
    feats["action"] = Feature(act.shape, "float32", act.names, act.low, act.high)
    if with_policy:
        feats["policy_action"] = Feature(act.shape, "float32", act.names)
    feats["intervention"] = Feature((), "bool")  # True: the human/teleop acted this step
    feats["success"] = Feature((), "bool")
    feats["timestamp"] = Feature((), "float64")  # seconds since the episode started, from the real clock
    if has_sim_state:
        n = len(robot.get_sim_state()["states"])
        feats["sim_state"] = Feature((n,), "float64")  # simulator state the observation came from
    return feats


def estimate_bytes_per_step(features: dict[str, Feature]) -> int:
    return int(sum(np.prod(f.shape, dtype=np.int64) * np.dtype(f.dtype).itemsize for f in features.values()))


def preflight(path: Path, features: dict[str, Feature], r: DictConfig) -> None:
    """Fail before the robot moves: unwritable path or not enough disk for the planned episodes."""
    parent = path if path.exists() else path.parent
    probe = parent / f".robot_rl_write_probe_{time.time_ns()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"record.path={str(path)!r} is not writable ({e.strerror}: {e.filename}); choose another "
            f"path or fix its permissions"
        ) from None
    need = estimate_bytes_per_step(features) * r.max_episode_steps * r.episodes  # uncompressed: an upper bound
    need = min(need, int(r.min_free_gb * 2**30)) if r.min_free_gb else need
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ConfigError(
            f"record.path={str(path)!r}: only {free / 2**30:.2f} GiB free, {need / 2**30:.2f} GiB "
            f"needed for {r.episodes} episodes of up to {r.max_episode_steps} steps (uncompressed, "
            f"capped at record.min_free_gb={r.min_free_gb}); free space or record fewer episodes"
        )


class EpisodeRecording:
    """A rollout hook that writes each step into an episode store (record, and deploy with a record path): the
    observation the action was chosen from, what was executed, who acted, success, the real clock and, in sim,
    the simulator state of that observation (so replay can restore it)."""

    def __init__(self, writer, robot, pacer: PacedLoop, with_policy: bool):
        self.writer, self.robot, self.pacer, self.with_policy = writer, robot, pacer, with_policy
        self.no_action = np.full(robot.action_feature.shape[0], np.nan, dtype=np.float32)
        self.sim_state = None
        self.t0 = time.perf_counter()

    def begin(self, meta: dict, store: EpisodeStore | None) -> None:
        """Right after the reset; with a `store` (sim) the episode's model and initial state go into `meta`."""
        if store is not None:
            state = self.robot.get_sim_state()
            meta["model_id"] = store.put_model_xml(state["model_xml"])
            meta["initial_sim_state"] = np.asarray(state["states"]).tolist()
            self.sim_state = state["states"]
        self.writer.begin(meta)
        self.t0 = time.perf_counter()

    def __call__(self, step) -> None:
        frame = {OBS_PREFIX + k: v for k, v in step.obs.items()}
        frame.update(
            action=np.asarray(step.action, np.float32),
            intervention=np.bool_(step.source == "teleop"),
            success=np.bool_(step.success),
            timestamp=np.float64(time.perf_counter() - self.t0),
        )
        if self.with_policy:
            frame["policy_action"] = (
                self.no_action if step.policy_action is None else np.asarray(step.policy_action, np.float32)
            )
        if self.sim_state is not None:
            frame["sim_state"] = self.sim_state
        with self.pacer.section("store_add"):
            self.writer.add(frame)
        if self.sim_state is not None:  # the state the next step's observation comes from
            self.sim_state = self.robot.get_sim_state()["states"]


def connect_devices(robot, teleop) -> None:
    """The teleop device first (one that cannot open fails before the robot is touched), then the robot; the
    teleop is closed again when the robot fails to connect."""
    if teleop is not None:
        teleop.connect()
    try:
        robot.connect()
    except BaseException:
        if teleop is not None:
            teleop.disconnect()
        raise


def hold_safe(robot, safety) -> None:
    """Leave a connected robot holding the safety filter's safe action (shutting down: a failure is logged)."""
    try:
        if robot.is_connected:
            action, _ = safety(np.zeros(robot.action_feature.shape[0], np.float32), force_safe=True)
            robot.send_action(action)
    except Exception:  # noqa: BLE001 - shutting down: report and keep going
        log.exception("could not send the final safe action")


def disconnect_devices(robot, teleop) -> None:
    """The robot, then the teleop device (after the robot has been left holding a safe action)."""
    robot.disconnect()
    if teleop is not None:
        teleop.disconnect()


class Recorder:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.r = cfg, cfg.record
        self.run_dir = Path(run_dir)
        self.robot = make_robot(cfg.robot)
        self.teleop = make_teleop(cfg.teleop, self.robot)
        self.policy = self._policy(cfg)
        if cfg.teleop.get("type") == "scripted" and cfg.robot.get("type") == "robosuite":
            from robot_rl.sim.experts import untuned_robot_warning

            untuned = untuned_robot_warning(cfg.robot.get("robots"))
            if untuned:
                log.warning("%s", untuned)
        if self.teleop is None and self.policy is None:
            raise ConfigError(
                "record needs someone to act: set teleop= (a device or the scripted expert) and/or "
                "record.policy_weights=<a train/distill/session run dir, checkpoint or artefact>"
            )
        self.controls = getattr(self.teleop, "controls", None)  # a device's save/rerecord/stop keys
        self.safety = build_safety(cfg, self.robot)
        self.loop = PacedLoop(self.r.fps)
        self.rollout = Rollout(
            self.robot,
            self.policy,
            teleop=self.teleop,
            safety=self.safety,
            success=self._operator_or_sim_success,
            pacer=self.loop,
            stop_on_success=bool(self.r.stop_on_success),
            success_extra_steps=int(self.r.success_extra_steps),
        )
        self._operator_success = False  # the operator pressed the success key this episode
        self._stop_signal = False
        self.saved: list[dict] = []
        self.discarded = 0

    def request_stop(self, *_):
        if not self._stop_signal:
            log.info("stop requested: dropping the episode in progress and holding the robot")
        self._stop_signal = True

    # -------------------------------------------------------------------------------------------- store
    def _open_store(self, features: dict[str, Feature]) -> EpisodeStore:
        path = Path(self.r.path)
        exists = (path / "meta.json").exists()
        if exists and not self.r.resume:
            raise ConfigError(
                f"record.path={str(path)!r} already holds an episode store: pass record.resume=true "
                f"to append to it, or choose a new path"
            )
        preflight(path, features, self.r)
        if not exists:
            info = {
                "robot": getattr(self.robot, "name", type(self.robot).__name__),
                "robot_config": OmegaConf.to_container(self.cfg.robot, resolve=True),
                "task": self.r.task,
            }
            return EpisodeStore.create(path, features, self.r.fps, chunk_steps=self.r.chunk_steps, info=info)
        store = EpisodeStore.open(path, "a")
        if {k: f.to_dict() for k, f in store.features.items()} != {k: f.to_dict() for k, f in features.items()}:
            raise ConfigError(
                f"record.path={str(path)!r} holds episodes with other keys/shapes than this robot "
                f"produces ({sorted(store.features)} vs {sorted(features)}); record into a new path"
            )
        if store.pending is not None:
            if self.r.partial == "recover":
                store.recover_pending()
            else:
                log.warning(
                    "dropping a partial episode left by a crash (%d steps); record.partial=recover keeps it",
                    store.pending["flushed"] - store.pending["start"],
                )
                store.drop_pending()
        log.info("resuming %s: %d episodes, %d steps already recorded", path, store.num_episodes, store.num_steps)
        return store

    # -------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        connect_devices(self.robot, self.teleop)
        store = None
        t_start = time.time()
        self.view = make_view(self.r, self.run_dir)  # record.viz=rerun: the live view, never on the loop's path
        try:
            has_sim_state = hasattr(self.robot, "get_sim_state")
            features = step_features(self.robot, self.policy is not None, has_sim_state)
            store = self._open_store(features)
            writer = store.writer()
            first_index = store.num_episodes
            seed = int(self.cfg.seed) + first_index  # resuming continues the seed sequence
            while len(self.saved) < self.r.episodes and not self._stop_signal:
                outcome, meta = self._record_episode(writer, store, seed, has_sim_state)
                if outcome in ("save", "stop-save"):
                    t0 = time.perf_counter()
                    index = writer.save(meta).result()
                    meta.update(index=index, save_s=time.perf_counter() - t0)
                    self.saved.append(meta)
                    log.info(
                        "saved episode %d: %d steps, success=%s, %d missed ticks (%.0f ms to save)",
                        index,
                        meta["length"],
                        meta["success"],
                        meta["missed_ticks"],
                        1e3 * meta["save_s"],
                    )
                    seed += 1
                else:
                    writer.discard()
                    self.discarded += 1
                    log.info("discarded the episode (%s)", outcome)
                    if outcome == "rerecord":
                        continue  # same seed: the operator records this scene again
                if outcome in ("stop", "stop-save"):
                    break
        except StoreError as e:
            log.error("%s", e)
            raise SystemExit(f"robot-rl record: {e}") from None
        finally:
            hold_safe(self.robot, self.safety)
            if store is not None:
                store.close()
            disconnect_devices(self.robot, self.teleop)
            summary = self._summary(time.time() - t_start, store)
            if self.view is not None:
                summary["viz"] = self.view.close()
            write_json(self.run_dir / "summary.json", summary)
        return summary

    def _record_episode(self, writer, store: EpisodeStore, seed: int, has_sim_state: bool) -> tuple[str, dict]:
        obs = self.rollout.reset(seed)
        meta = {
            "task": self.r.task,
            "operator": self.r.operator,
            "robot": getattr(self.robot, "name", "robot"),
            "seed": seed,
            "start_time": time.time(),
        }
        recording = EpisodeRecording(writer, self.robot, self.loop, with_policy=self.policy is not None)
        recording.begin(meta, store if has_sim_state else None)
        overruns0, missed0, dropped0 = self.loop.overruns, self.loop.missed_slots, self._dropped_frames()
        self._operator_success = False
        t0 = last_report = time.perf_counter()

        def episode_controls(step: int, obs) -> str | None:
            """The operator's keys, one poll per tick: save / rerecord / stop end the episode before this step."""
            event = self.controls.poll() if self.controls is not None else None
            if self._stop_signal:
                return "interrupted"
            if event == "success" and not self._operator_success:  # latched: this and every later step succeed
                self._operator_success = True
                meta["operator_success_step"] = step
                log.info("operator marked success at step %d", step)
            if event in ("save", "rerecord", "stop"):
                if writer.steps == 0:
                    return "stop" if event == "stop" else "rerecord"
                return {"save": "save", "rerecord": "rerecord", "stop": "stop-save"}[event]
            return None

        def report(step) -> None:
            nonlocal last_report
            now = time.perf_counter()
            if now - last_report >= self.r.report_every_s:
                last_report = now
                log.info(
                    "episode %d step %d: %.1f Hz (target %.0f), %d missed ticks, %d dropped frames, success=%s",
                    len(self.saved),
                    step.index + 1,
                    (step.index + 1) / (now - t0),
                    self.r.fps,
                    self.loop.missed_slots - missed0,
                    self._dropped_frames() - dropped0,
                    step.success,
                )

        result = self.rollout.episode(
            obs,
            self.r.max_episode_steps,
            teleop_drives=self.policy is None,
            before_step=episode_controls,
            hooks=[recording, report] + ([lambda step: self.view.log_step(step, len(self.saved))] if self.view else []),
            keep_pacing_stats=bool(self.saved or self.discarded),
        )
        meta.update(
            success=result["success"],
            length=writer.steps,
            missed_ticks=self.loop.missed_slots - missed0,
            overruns=self.loop.overruns - overruns0,
            dropped_frames=self._dropped_frames() - dropped0,
            interventions=int(result["teleop_steps"] if self.policy is not None else 0),
            duration_s=time.perf_counter() - t0,
            achieved_hz=writer.steps / max(time.perf_counter() - t0, 1e-9),
        )
        return result["ended_by"] or "save", meta

    def _policy(self, cfg: DictConfig):
        """The policy that drives, or None. A checkpoint (run dir, policy directory, artefact, or the
        policy.safetensors inside one) brings its own architecture: `policy=` is not needed. A bare safetensors
        file of weights only needs `policy=` set as it was trained."""
        from robot_rl.policies.checkpoint import CheckpointError, load_policy

        weights = self.r.policy_weights
        path = Path(str(weights)) if weights else None
        if path is not None and path.suffix == ".safetensors" and (path.parent / "manifest.json").exists():
            path = path.parent
        if path is not None and path.suffix != ".safetensors":
            if cfg.policy.get("type", "none") != "none":
                log.warning("policy=%s ignored: %s carries its own policy config", cfg.policy.type, path)
            try:
                policy = load_policy(path, device="cpu")
            except (CheckpointError, OSError, ValueError) as e:
                raise ConfigError(f"record.policy_weights={str(weights)!r}: {e}") from None
            try:
                check_compatible(policy, self.robot)
            except ConfigError as e:
                raise ConfigError(f"record.policy_weights={str(weights)!r}: {e}") from None
            return policy
        policy = make_policy(cfg.policy, self.robot)
        if policy is None:
            return None
        if path is None:
            raise ConfigError(
                f"policy={cfg.policy.type} is set but record.policy_weights is empty: give its checkpoint (a run "
                "dir or policy directory)"
            )
        from safetensors.torch import load_file

        try:
            policy.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError) as e:
            first = str(e).strip().splitlines()
            raise ConfigError(
                f"record.policy_weights={str(weights)!r} does not fit policy={cfg.policy.type} as configured "
                f"({first[1].strip() if len(first) > 1 else first[0][:200]} ...): give the checkpoint directory "
                "instead (its manifest says how the policy was built)"
            ) from None
        return policy

    def _operator_or_sim_success(self, obs, robot) -> bool:
        return self._operator_success or bool(robot.is_success())

    def _dropped_frames(self) -> int:
        """Camera frames the robot reports were not new when read, cumulative (LeRobotRobot counts stale frames;
        the MuJoCo robot renders every tick synchronously, so it has none)."""
        counter = getattr(self.robot, "dropped_frames", None)
        return int(counter() if callable(counter) else (counter or 0))

    def _summary(self, wall_s: float, store: EpisodeStore | None) -> dict:
        return {
            "process": "record",
            "path": str(self.r.path),
            "saved": len(self.saved),
            "discarded": self.discarded,
            "store_episodes": store.num_episodes if store is not None else None,
            "success_rate": float(np.mean([m["success"] for m in self.saved])) if self.saved else None,
            "missed_ticks": int(sum(m["missed_ticks"] for m in self.saved)),
            "dropped_frames": int(sum(m["dropped_frames"] for m in self.saved)),
            "episodes": [{k: v for k, v in m.items() if k != "initial_sim_state"} for m in self.saved],
            "pacing": self.loop.stats(),
            "safety_events": dict(self.safety.counts),
            "wall_s": wall_s,
            "sources": list(SOURCES),
        }


def policy_io(policy) -> tuple[dict[str, tuple[int, ...]], int]:
    """The observation shapes a policy reads and its action size."""
    manifest = getattr(policy, "manifest", None)
    if manifest and not manifest.get("legacy"):  # every kind, residual on its base included
        return (
            {k: tuple(int(x) for x in d["shape"]) for k, d in manifest["obs"].items()},
            int(np.prod(manifest["action"]["shape"])),
        )
    if hasattr(policy, "obs_features"):
        return {k: tuple(f.shape) for k, f in policy.obs_features.items()}, int(policy.action_dim)
    return ({k: (int(d),) for k, d in zip(policy.obs_keys, policy.obs_dims)}, int(policy.action_low.shape[0]))


def check_compatible(policy, robot) -> None:
    obs, adim = policy_io(policy)
    feats = robot.observation_features
    missing = [k for k in obs if k not in feats]
    if missing:
        raise ConfigError(
            f"the policy reads observations {missing} that robot {robot.name!r} does not produce "
            f"(it has {sorted(feats)}); deploy on the robot it was trained for (robot=...)"
        )
    wrong = {k: (obs[k], tuple(feats[k].shape)) for k in obs if tuple(feats[k].shape) != obs[k]}
    if wrong:
        raise ConfigError(
            "observation shapes differ between the policy and the robot (policy, robot): "
            + ", ".join(f"{k}: {p} vs {r}" for k, (p, r) in wrong.items())
        )
    robot_adim = int(np.prod(robot.action_feature.shape))
    if robot_adim != adim:
        raise ConfigError(f"the policy outputs {adim} action entries, robot {robot.name!r} takes {robot_adim}")


def validate_record(cfg: DictConfig) -> None:
    """Every number of `record.*` checked before the robot is built: one message naming the field."""
    for field in ("episodes", "max_episode_steps", "chunk_steps"):
        positive(cfg, f"record.{field}", integer=True)
    for field in ("fps", "report_every_s"):
        positive(cfg, f"record.{field}")
    if not isinstance(cfg.record.success_extra_steps, int) or cfg.record.success_extra_steps < 0:
        raise ConfigError(f"record.success_extra_steps must be 0 or more steps, got {cfg.record.success_extra_steps!r}")
    if cfg.record.partial not in ("drop", "recover"):
        raise ConfigError(f"record.partial must be drop or recover, got {cfg.record.partial!r}")


def final_line(summary: dict, fps: float, run_dir: Path) -> str:
    """What the run did in one line: episodes, success, the rate achieved, overruns, where the files are."""
    eps = summary["episodes"]
    rate = summary["success_rate"]
    hz = [m["achieved_hz"] for m in eps if m.get("achieved_hz")]
    parts = [
        f"record: {summary['saved']} episodes saved"
        + (f", {summary['discarded']} discarded" if summary["discarded"] else "")
        + (
            f" (store holds {summary['store_episodes']})"
            if summary["store_episodes"] not in (None, summary["saved"])
            else ""
        ),
        "success n/a" if rate is None else f"success {rate:.0%}",
        f"{min(hz):.1f}-{max(hz):.1f}/{fps:g} Hz"
        if hz and min(hz) < max(hz) - 0.05
        else f"{hz[0] if hz else 0:.1f}/{fps:g} Hz",
        f"{sum(int(m.get('overruns', 0)) for m in eps)} overruns, {summary['missed_ticks']} missed ticks"
        + (f", {summary['dropped_frames']} dropped frames" if summary["dropped_frames"] else ""),
    ]
    return ", ".join(parts) + f" -> {summary['path']} (run: {Path(run_dir) / 'summary.json'})"


def main(cfg: DictConfig, run_dir: str | Path) -> int:
    """`robot-rl record`: exit 0 when at least one episode was saved or deliberately discarded."""
    validate_record(cfg)
    summary = Recorder(cfg, Path(run_dir)).run()
    print(final_line(summary, float(cfg.record.fps), Path(run_dir)), flush=True)
    return 0 if summary["saved"] or summary["discarded"] else 1
