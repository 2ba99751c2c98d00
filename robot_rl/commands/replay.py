"""`robot-rl replay STORE`: replay a recorded episode in MuJoCo; report how far it drifts, optionally as an mp4.

  robot-rl replay STORE [--episode N | --all] [--mode state|open_loop] [--video out.mp4] [--cameras C ...]
                  [--size 256 | HxW] [--sim-robot NAME|PATH] [--tolerance M] [--json report.json] [--strict]

Two modes (see docs/replay.md):

  state      (sim episodes with `sim_state`; the default for them) restore the recorded model and first simulator
             state, execute the recorded actions one by one, and after each compare the replayed state/observation
             with the recorded next one. A deterministic recording replays to float precision; divergence here
             means the recording does not describe what was simulated (other model, dropped steps, edited data).
  open_loop  (any episode; the default without `sim_state`) reset the sim robot with the episode's seed and send
             the recorded actions: what those actions do from a freshly generated scene. Real-robot episodes
             (a lerobot robot_config) need a simulator to replay in: --sim-robot lift (configs/robot/lift.yaml)
             or a path to a robot config yaml.

Divergence is measured on the observation keys both sides have: every 3-vector key ending in `_pos`
(`cube_pos`, `robot0_eef_pos`, `gripper_to_cube_pos` ...) as a Euclidean distance in metres; with recorded
sim states also the max abs error of qpos/qvel. Entry t of each per-step list compares the replayed state the
t-th action is applied to with recorded row t (t = 0: the start state). An episode counts as diverged when the
replayed simulator state is more than --tolerance off the recorded one (max |qpos error|: metres for free bodies,
radians for joints), or, without recorded states, a position observation is: robosuite's recorded observations
lag the recorded state by one physics substep (up to ~0.8 mm), the recorded state does not.

Exit status: 0 replayed; 1 with --strict when an episode diverged past the tolerance or its success differs;
2 a usage error (bad index, state mode without sim_state, unknown camera ...), message on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from robot_rl.data.divergence import Divergence, first_true, has_sim_states, recorded_observations
from robot_rl.data.episode_store import EpisodeStore, StoreError
from robot_rl.interfaces import OBS_PREFIX, Robot

log = logging.getLogger("robot_rl.commands.replay")

MODES = ("state", "open_loop")
DEFAULT_TOLERANCE = 1e-3  # max |qpos error| (m, rad) or, without sim states, m of position divergence: diverged
DEFAULT_CAMERA = "agentview"
_IMAGE_SUFFIX = "_image"


class ReplayError(ValueError):
    """A replay that cannot run as asked; the message (one line) says why and what to do."""


# ------------------------------------------------------------------------------------------------ robot config
def _available_robot_configs() -> list[str]:
    from importlib import resources

    return sorted(
        p.name[:-5] for p in (resources.files("robot_rl.configs") / "robot").iterdir() if p.name.endswith(".yaml")
    )


def sim_robot_config(spec: str | dict) -> dict:
    """A simulator robot config: a dict, a name from configs/robot/ (`lift`, `stack` ...) or a yaml path.
    It must be a robosuite config (real robots cannot replay anything)."""
    from omegaconf import OmegaConf

    if isinstance(spec, dict):
        cfg = copy.deepcopy(spec)
        what = "the sim robot config"
    else:
        from importlib import resources

        path = Path(spec)
        if not (path.suffix in (".yaml", ".yml") and path.is_file()):
            packaged = resources.files("robot_rl.configs") / "robot" / f"{spec}.yaml"
            if not packaged.is_file():
                raise ReplayError(
                    f"--sim-robot {spec!r}: no such robot config; give one of "
                    f"{', '.join(_available_robot_configs())} or a path to a robot config .yaml"
                )
            path = packaged
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        what = f"--sim-robot {spec!r}"
    if not isinstance(cfg, dict) or cfg.get("type") != "robosuite":
        kind = cfg.get("type") if isinstance(cfg, dict) else None
        raise ReplayError(
            f"{what} is not a simulator robot config (type={kind!r}); replay needs a robosuite one, "
            f"e.g. --sim-robot lift"
        )
    return cfg


def replay_robot_config(store: EpisodeStore, sim_robot: str | dict | None = None) -> dict:
    """The config of the sim robot an episode of `store` replays on: `sim_robot` if given, else the recorded
    `robot_config` (a robosuite one, or our sim behind lerobot: `lerobot_type: robot_rl_sim`). Cameras are
    off: a replay video is rendered separately, so the simulated steps and their timing are the same with or
    without one."""
    recorded = store.meta.get("info", {}).get("robot_config") or {}
    if sim_robot is not None:
        cfg = sim_robot_config(sim_robot)
    elif recorded.get("type") == "robosuite":
        cfg = copy.deepcopy(recorded)
    elif recorded.get("type") == "lerobot" and recorded.get("lerobot_type") == "robot_rl_sim":
        keys = ("env_name", "robots", "control_freq", "horizon", "controller", "reward_shaping")
        cfg = {"type": "robosuite", **{k: recorded[k] for k in keys if recorded.get(k) is not None}}
    else:
        kind = recorded.get("lerobot_type") or recorded.get("type") or "an unknown robot (no robot_config)"
        raise ReplayError(
            f"{store.path} was recorded on {kind}, not in simulation: pass --sim-robot NAME (one of "
            f"{', '.join(_available_robot_configs())}) or a robot config .yaml to replay it in"
        )
    cfg["cameras"] = []
    cfg.pop("safety", None)
    return cfg


def build_replay_robot(store: EpisodeStore, sim_robot: str | dict | None = None) -> Robot:
    from robot_rl.config import ConfigError
    from robot_rl.factory import make_robot

    try:
        robot = make_robot(replay_robot_config(store, sim_robot))
    except ConfigError as e:
        raise ReplayError(f"cannot build the sim robot: {e}") from None
    robot.connect()
    return robot


# --------------------------------------------------------------------------------------------------- cameras
class SimCameras:
    """Renders named cameras of a robosuite sim robot at its current state (own mujoco.Renderer, so the robot
    itself runs without cameras). Follows model reloads."""

    def __init__(self, robot: Robot, cameras: Sequence[str], height: int, width: int, quality: str = "fast"):
        env = getattr(robot, "env", None)
        if env is None:
            raise ReplayError("a replay video needs a robosuite sim robot (one with .env)")
        available = list(env.sim.model.camera_names)
        unknown = [c for c in cameras if c not in available]
        if unknown:
            raise ReplayError(
                f"unknown camera {unknown[0]!r}: the {getattr(robot, 'env_name', 'sim')} scene has "
                f"{', '.join(available)}"
            )
        self.robot, self.cameras = robot, list(cameras)
        self.height, self.width, self.quality = int(height), int(width), quality
        self._renderer = self._model = None

    def render(self) -> list[np.ndarray]:
        import mujoco

        env = self.robot.env
        model, data = env.sim.model._model, env.sim.data._data
        if self._renderer is None or self._model is not model:
            self.close()
            if self.quality == "fast":
                model.vis.quality.offsamples = 0
            if model.vis.global_.offheight < self.height or model.vis.global_.offwidth < self.width:
                model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
                model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
            self._renderer = mujoco.Renderer(model, self.height, self.width)
            self._model = model
        out = []
        for c in self.cameras:
            self._renderer.update_scene(data, camera=c)
            if self.quality == "fast":
                self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            out.append(self._renderer.render().copy())
        return out

    def close(self) -> None:
        if self._renderer is not None:
            try:
                self._renderer.close()
            except Exception:  # noqa: BLE001 - a GL context that is already gone
                log.debug("renderer close failed", exc_info=True)
        self._renderer = self._model = None


def default_cameras(store: EpisodeStore, robot: Robot) -> list[str]:
    """The cameras the episode was recorded with (those the sim scene has), else agentview (else the scene's
    first camera)."""
    env = getattr(robot, "env", None)
    available = list(env.sim.model.camera_names) if env is not None else []
    rc = store.meta.get("info", {}).get("robot_config") or {}
    recorded = list(rc.get("cameras") or rc.get("camera_names") or [])
    recorded += [
        k[len(OBS_PREFIX) : -len(_IMAGE_SUFFIX)]
        for k, f in store.features.items()
        if k.startswith(OBS_PREFIX) and k.endswith(_IMAGE_SUFFIX) and f.is_image
    ]
    cams = list(dict.fromkeys(c for c in recorded if c in available))
    if cams:
        return cams
    return [DEFAULT_CAMERA] if DEFAULT_CAMERA in available or not available else [available[0]]


# ------------------------------------------------------------------------------------------------------ replay
def _episode_to_replay(store: EpisodeStore, index, mode: str | None) -> tuple[int, dict, dict, str]:
    """(index, episode metadata, low-dim columns, mode) after checking the episode can be replayed as asked."""
    n = store.num_episodes
    if not isinstance(index, (int, np.integer)) or not -n <= index < n:
        raise ReplayError(
            f"episode {index} out of range: {store.path} has {n} episodes" + (f" (0..{n - 1})" if n else "")
        )
    index = int(index) % n
    ep = store.episode(index, [k for k, f in store.features.items() if not f.is_image])
    if "action" not in ep:
        raise ReplayError(f"{store.path} has no `action` key: nothing to replay")
    has_states = has_sim_states(ep.get("sim_state"))
    mode = mode or ("state" if has_states else "open_loop")
    if mode not in MODES:
        raise ReplayError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "state" and not has_states:
        raise ReplayError(
            f"episode {index} of {store.path} has no recorded simulator states (sim_state), so it "
            f"cannot be replayed in state mode: use --mode open_loop"
        )
    if len(ep["action"]) == 0:
        raise ReplayError(f"episode {index} of {store.path} has no steps")
    return index, store.episodes[index], ep, mode


def _check_actions(store: EpisodeStore, index: int, actions: np.ndarray, robot: Robot, warnings: list[str]) -> None:
    act_feat = robot.action_feature
    if actions.shape[1:] != tuple(act_feat.shape):
        raise ReplayError(
            f"episode {index} has {actions.shape[1] if actions.ndim > 1 else 1}-entry actions "
            f"({', '.join(store.features['action'].names or ())}) but the sim robot takes "
            f"{act_feat.shape[0]} ({', '.join(act_feat.names or ())}): choose a matching "
            f"--sim-robot"
        )
    rec_names = store.features["action"].names
    if rec_names and act_feat.names and tuple(rec_names) != tuple(act_feat.names):
        warnings.append(f"action names differ: recorded {list(rec_names)}, sim {list(act_feat.names)}")
    if not np.all(np.isfinite(actions)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(actions), axis=1))[0])
        raise ReplayError(f"episode {index} has non-finite actions (first at step {bad}): cannot replay them")


def _start_state(store: EpisodeStore, index: int, meta: dict, ep: dict, mode: str, robot: Robot, warnings) -> dict:
    """Put the sim robot in the episode's first state (state mode) or its seeded scene (open loop); the first
    observation."""
    xml = None
    if meta.get("model_id"):
        try:
            xml = store.model_xml(meta["model_id"])
        except FileNotFoundError:
            raise ReplayError(
                f"{store.path}: the simulator model {meta['model_id']} of episode {index} is "
                f"missing (models/{meta['model_id']}.xml)"
            ) from None
    recorded_cfg = store.meta.get("info", {}).get("robot_config") or {}
    states = ep.get("sim_state")
    has_states = has_sim_states(states)
    if mode == "state":
        rec_env, sim_env = recorded_cfg.get("env_name"), getattr(robot, "env_name", None)
        if rec_env and sim_env and rec_env != sim_env:
            raise ReplayError(
                f"episode {index} was recorded in {rec_env}, the sim robot is {sim_env}: a state "
                f"replay needs the recorded scene (drop --sim-robot, or use --mode open_loop)"
            )
        return robot.set_sim_state({"model_xml": xml, "states": states[0]})
    same_scene = recorded_cfg.get("env_name") == getattr(robot, "env_name", None)
    initial = states[0] if has_states else meta.get("initial_sim_state")
    if xml is not None and same_scene and initial is not None and hasattr(robot, "set_sim_state"):
        # the recorded model first: robosuite draws object sizes when it builds a model (not per seed)
        robot.set_sim_state({"model_xml": xml, "states": np.asarray(initial, np.float64)})
    seed = meta.get("seed")
    if seed is None:
        warnings.append(
            f"episode {index} has no seed: its scene cannot be regenerated, the actions play from a fresh "
            "random scene" + (" (use --mode state: the store has its simulator states)" if has_states else "")
        )
    return robot.reset(seed=None if seed is None else int(seed))


def _divergence(store: EpisodeStore, ep: dict, mode: str, robot: Robot, warnings: list[str]) -> Divergence:
    sim_feats = robot.observation_features
    rec_obs = recorded_observations(store, ep, sim_feats)
    states = ep.get("sim_state")
    state_robot = robot if has_sim_states(states) and hasattr(robot, "get_sim_state") else None
    if state_robot is not None and len(robot.get_sim_state()["states"]) != states.shape[1]:
        if mode == "state":
            raise ReplayError(
                f"the recorded simulator states have {states.shape[1]} entries, the replay "
                f"model {len(robot.get_sim_state()['states'])}: a different scene"
            )
        state_robot = None
        warnings.append("recorded sim states do not fit the replay model: qpos not compared")
    shapes = {k: tuple(sim_feats[k].shape) for k in rec_obs}
    return Divergence(rec_obs, shapes, len(ep["action"]), states, state_robot)


class _Video:
    """The replay's mp4: each camera rendered from the sim, beside the recorded frame of the same camera when the
    store has it ("recorded | replayed", one row per camera)."""

    def __init__(self, path, store, index, robot, cameras, size, render_quality, side_by_side):
        from robot_rl.video import Mp4Writer

        self.path, self.size = path, size
        cam_list = list(cameras) if cameras else default_cameras(store, robot)
        self.cams = SimCameras(robot, cam_list, size[0], size[1], render_quality)
        rec_keys = [f"{OBS_PREFIX}{c}{_IMAGE_SUFFIX}" for c in cam_list]
        rec_keys = [k for k in rec_keys if k in store.features and store.features[k].is_image]
        self.recorded = store.episode(index, rec_keys) if side_by_side and rec_keys else {}
        self.writer = Mp4Writer(path, fps=store.fps)

    def write(self, t: int) -> None:
        views = self.cams.render()
        if not self.recorded:
            self.writer.write(_tile(views))
            return
        cells = []
        for c, v in zip(self.cams.cameras, views):
            k = f"{OBS_PREFIX}{c}{_IMAGE_SUFFIX}"
            rec = self.recorded[k][t] if k in self.recorded else np.zeros_like(v)
            cells += [_resize(rec, v.shape[0], v.shape[1]), v]
        self.writer.write(_tile(cells, columns=2, gap=2))

    def close(self) -> None:
        self.cams.close()
        self.writer.close()

    def report(self) -> dict:
        return {
            "path": str(self.path),
            "frames": self.writer.frames,
            "cameras": self.cams.cameras,
            "size": list(self.size),
            "codec": self.writer.codec,
            "recorded_side_by_side": sorted(self.recorded),
        }


def replay_episode(
    store: EpisodeStore,
    index: int,
    mode: str | None = None,
    robot: Robot | None = None,
    video: str | Path | None = None,
    cameras: Sequence[str] | None = None,
    camera_size: tuple[int, int] = (256, 256),
    sim_robot: str | dict | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    side_by_side: bool = True,
) -> dict[str, Any]:
    """Replay episode `index` of `store`; returns the report (JSON-serialisable dict, see docs/replay.md).

    mode: "state" | "open_loop" | None (state when the episode has sim states). robot: a sim robot to reuse
    (connected here if needed, left connected); by default one is built from the recorded robot config, or from
    `sim_robot` (a config dict or name). video: mp4 path; `cameras` (default: the recorded ones, else agentview)
    rendered at `camera_size` (height, width), beside the recorded frames of the same camera when the store has
    them ("recorded | replayed", one row per camera)."""
    index, meta, ep, mode = _episode_to_replay(store, index, mode)
    actions = np.asarray(ep["action"], np.float32)
    steps = len(actions)
    own_robot = robot is None
    if own_robot:
        robot = build_replay_robot(store, sim_robot)
    elif not robot.is_connected:
        robot.connect()
    warnings: list[str] = []
    out = None
    try:
        _check_actions(store, index, actions, robot, warnings)
        obs = _start_state(store, index, meta, ep, mode, robot, warnings)
        divergence = _divergence(store, ep, mode, robot, warnings)
        divergence.compare(0, obs)
        if video is not None:
            quality = (
                replay_robot_config(store, sim_robot).get("render_quality", "fast")
                if own_robot
                else getattr(robot, "render_quality", "fast")
            )
            out = _Video(video, store, index, robot, cameras, camera_size, quality, side_by_side)

        success, step_s = np.zeros(steps, bool), np.zeros(steps)
        t_start = time.perf_counter()
        for t in range(steps):
            if out is not None:
                out.write(t)  # the state action t is applied to, as recorded frame t shows
            t0 = time.perf_counter()
            robot.send_action(actions[t])
            step_s[t] = time.perf_counter() - t0
            success[t] = bool(robot.is_success())
            if t + 1 < steps:
                divergence.compare(t + 1, robot.get_observation())
        wall_s = time.perf_counter() - t_start
    finally:
        if out is not None:
            out.close()
        if own_robot:
            robot.disconnect()

    rec_success = np.asarray(ep["success"], bool) if "success" in ep else None
    period = 1.0 / store.fps
    report: dict[str, Any] = {
        "store": str(store.path),
        "episode": index,
        "mode": mode,
        "steps": steps,
        "fps": store.fps,
        "sim": {k: v for k, v in replay_robot_config(store, sim_robot).items() if k in ("env_name", "robots")}
        if own_robot
        else {"env_name": getattr(robot, "env_name", None)},
        "seed": meta.get("seed") if mode == "open_loop" else None,
        "tolerance_m": tolerance,
        **divergence.report(tolerance),
        "success_recorded": bool(rec_success[-1]) if rec_success is not None else meta.get("success"),
        "success_replayed": bool(success[-1]),
        "first_success_step_recorded": first_true(rec_success) if rec_success is not None else None,
        "first_success_step_replayed": first_true(success),
        "success_agreement": float(np.mean(success == rec_success)) if rec_success is not None else None,
        "step_time_ms": {"mean": 1e3 * float(step_s.mean()), "max": 1e3 * float(step_s.max())},
        "control_period_ms": 1e3 * period,
        "realtime_factor": float(period / step_s.mean()) if step_s.mean() > 0 else None,
        "wall_s": wall_s,
        "video": None if out is None else out.report(),
        "warnings": warnings,
    }
    report["success_match"] = (
        report["success_recorded"] == report["success_replayed"] if report["success_recorded"] is not None else None
    )
    return report


def _tile(images, columns=None, gap=0):
    from robot_rl.video import tile

    return tile(images, columns=columns, gap=gap)


def _resize(image, h, w):
    from robot_rl.video import resize_nearest

    return resize_nearest(np.asarray(image), h, w)


# ------------------------------------------------------------------------------------------------------ output
def _fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.2g}{unit}"


def format_summary(r: dict) -> str:
    """A few human lines about one report."""
    head = f"episode {r['episode']}: {r['mode']} replay of {r['steps']} steps"
    if r["seed"] is not None:
        head += f" (seed {r['seed']})"
    lines = [head]
    if r["max_divergence_m"] is not None:
        line = (
            f"  position divergence: max {_fmt(r['max_divergence_m'], ' m')} ({r['max_divergence_key']} at step "
            f"{r['max_divergence_step']}), final {_fmt(r['final_divergence_m'], ' m')}, start "
            f"{_fmt(r['pos_err_m']['initial'], ' m')}; "
        )
        if r.get("divergence_basis") != "sim_state":
            line += (
                f"first above {r['tolerance_m']:g} m at step {r['first_exceed_step']}"
                if r["diverged"]
                else f"never above {r['tolerance_m']:g} m"
            )
        lines.append(line.rstrip("; "))
    else:
        lines.append(
            f"  no position keys in common with the sim ({len(r['compared_keys'])} observation keys "
            f"compared): divergence not measured"
        )
    if r["qpos_err"] is not None:
        lines.append(
            f"  sim state: max |qpos error| {_fmt(r['qpos_err']['max'])}, max |qvel error| {_fmt(r['qvel_err']['max'])}"
            + (
                (
                    f"; DIVERGED: qpos off by more than {r['tolerance_m']:g} from step {r['first_exceed_step']}"
                    if r["diverged"]
                    else f"; never more than {r['tolerance_m']:g} off (diverged is judged on the sim state)"
                )
                if r.get("divergence_basis") == "sim_state"
                else ""
            )
        )
    yn = {True: "yes", False: "no", None: "unknown"}
    rec, rep = r["success_recorded"], r["success_replayed"]
    lines.append(
        f"  success: recorded {yn[rec]}"
        + (f" (from step {r['first_success_step_recorded']})" if r["first_success_step_recorded"] is not None else "")
        + f", replayed {yn[rep]}"
        + (f" (from step {r['first_success_step_replayed']})" if r["first_success_step_replayed"] is not None else "")
    )
    st = r["step_time_ms"]
    rt = f"{r['realtime_factor']:.0f}x real time" if r["realtime_factor"] else "real-time factor n/a"
    lines.append(
        f"  sim step {st['mean']:.2f} ms mean / {st['max']:.2f} ms max (control period "
        f"{r['control_period_ms']:.0f} ms: {rt})"
    )
    if r["video"]:
        v = r["video"]
        side = " (recorded | replayed)" if v["recorded_side_by_side"] else ""
        lines.append(f"  video: {v['path']} ({v['frames']} frames, {', '.join(v['cameras'])}{side})")
    lines += [f"  warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8 or max(parts) > 4096:
        raise argparse.ArgumentTypeError(f"size {text!r}: give N (square) or HxW, 8..4096 pixels")
    return parts[0], parts[1]


def _video_path(video: str, index: int, many: bool) -> Path:
    p = Path(video)
    return p.with_name(f"{p.stem}_ep{index:03d}{p.suffix or '.mp4'}") if many else p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="robot-rl replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("store", help="episode store directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--episode", type=int, default=0, help="episode index (default 0; negative from the end)")
    which.add_argument("--all", action="store_true", help="replay every episode")
    p.add_argument("--mode", choices=MODES, help="default: state when the episode has sim_state, else open_loop")
    p.add_argument("--video", help="write an mp4 of the replay (with --all: one per episode, NAME_epNNN.mp4)")
    p.add_argument("--cameras", nargs="+", help="cameras for the video (default: the recorded ones, else agentview)")
    p.add_argument("--size", type=_parse_size, default=(256, 256), help="video camera size: N or HxW (default 256)")
    p.add_argument(
        "--sim-robot",
        help="sim robot config to replay in: a name in configs/robot (lift, stack ...) "
        "or a .yaml path; needed for real-robot episodes",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"position divergence (m) that counts as diverged (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument("--json", help="write the full report(s) here")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if an episode diverged past the tolerance or its success differs"
    )
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)

    robot = None
    reports = []
    try:
        store = EpisodeStore.open(args.store, "r")
        if store.num_episodes == 0:
            raise ReplayError(f"{store.path} has no episodes")
        indices = list(range(store.num_episodes)) if args.all else [args.episode]
        for i in indices:  # validate the index before building a simulator
            if not -store.num_episodes <= i < store.num_episodes:
                raise ReplayError(
                    f"episode {i} out of range: {store.path} has {store.num_episodes} episodes "
                    f"(0..{store.num_episodes - 1})"
                )
        robot = build_replay_robot(store, args.sim_robot)
        for i in indices:
            video = None if args.video is None else _video_path(args.video, i % store.num_episodes, args.all)
            r = replay_episode(
                store,
                i,
                mode=args.mode,
                robot=robot,
                video=video,
                cameras=args.cameras,
                camera_size=args.size,
                sim_robot=args.sim_robot,
                tolerance=args.tolerance,
            )
            reports.append(r)
            print(format_summary(r), flush=True)
    except (ReplayError, StoreError) as e:
        print(f"robot-rl replay: {e}", file=sys.stderr)
        return 2
    finally:
        if robot is not None:
            robot.disconnect()
    if args.all and len(reports) > 1:
        div = [r for r in reports if r["diverged"]]
        succ = sum(bool(r["success_match"]) for r in reports)
        print(
            f"{len(reports)} episodes: {len(div)} diverged past {args.tolerance:g} m, success reproduced in "
            f"{succ}/{len(reports)}"
        )
    if args.json:
        out = {"store": str(args.store), "episodes": reports} if args.all else reports[0]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.strict and any(r["diverged"] or r["success_match"] is False for r in reports):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
