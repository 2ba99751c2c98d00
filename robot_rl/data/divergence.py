"""How far a replay drifts from its recording: the recorded observations under a sim robot's keys, and the per-step
errors of positions (metres), of every observation key, and of the simulator state (qpos/qvel) where both sides
have one. Used by `robot-rl replay` (robot_rl/commands/replay.py; docs/replay.md)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX, Feature


def has_sim_states(ep_states: np.ndarray | None) -> bool:
    return ep_states is not None and len(ep_states) > 0 and bool(np.any(ep_states[0] != 0))


def recorded_observations(
    store: EpisodeStore, ep: dict[str, np.ndarray], sim_features: dict[str, Feature]
) -> dict[str, np.ndarray]:
    """The recorded low-dim observations under the sim robot's keys: `obs.<key>` of the same shape, and
    lerobot-style flat vectors whose entries are named `<key>.<i>` (or `<key>` for a scalar), as the lerobot
    adapter records a `state` vector. Keys the sim does not have are left out."""
    out: dict[str, np.ndarray] = {}
    sim_lowdim = {k: f for k, f in sim_features.items() if not f.is_image}
    for key, f in store.features.items():
        k = key[len(OBS_PREFIX) :]
        if (
            key.startswith(OBS_PREFIX)
            and not f.is_image
            and k in sim_lowdim
            and tuple(sim_lowdim[k].shape) == tuple(f.shape)
            and key in ep
        ):
            out[k] = np.asarray(ep[key], np.float64)
    for key, f in store.features.items():
        if not key.startswith(OBS_PREFIX) or f.is_image or not f.names or len(f.shape) != 1 or key not in ep:
            continue
        groups: dict[str, dict[int, int]] = {}
        for j, name in enumerate(f.names):
            base, _, idx = name.rpartition(".")
            if base in sim_lowdim and idx.isdigit():
                groups.setdefault(base, {})[int(idx)] = j
            elif name in sim_lowdim and int(np.prod(sim_lowdim[name].shape)) == 1:
                groups[name] = {0: j}
        for base, cols in groups.items():
            shape = tuple(sim_lowdim[base].shape)
            n = int(np.prod(shape))
            if base not in out and sorted(cols) == list(range(n)):
                data = np.asarray(ep[key], np.float64)[:, [cols[i] for i in range(n)]]
                out[base] = data.reshape(len(data), *shape)
    return out


def position_keys(keys: Sequence[str], shapes: dict[str, tuple]) -> list[str]:
    """3-D positions (metres): keys ending in `_pos` with 3 entries (not `robot0_joint_pos`: angles)."""
    return [k for k in keys if k.endswith("_pos") and tuple(shapes[k]) == (3,)]


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def first_true(flags: Sequence[bool]) -> int | None:
    return next((i for i, f in enumerate(flags) if f), None)


class Divergence:
    """Per-step error of the replay against the recording: observations (positions in metres, every key's max
    abs error) and, when both sides have simulator states, max |qpos| and |qvel| errors."""

    def __init__(self, rec_obs: dict[str, np.ndarray], shapes: dict[str, tuple], steps: int, states, robot):
        self.rec_obs, self.states, self.robot = rec_obs, states, robot
        self.pos_keys = position_keys(list(rec_obs), shapes)
        self.pos_err = {k: np.full(steps, np.nan) for k in self.pos_keys}
        self.obs_err = {k: np.full(steps, np.nan) for k in rec_obs}
        self.qpos_err, self.qvel_err = np.full(steps, np.nan), np.full(steps, np.nan)
        self.nq = int(robot.env.sim.model.nq) if robot is not None else 0
        self.nv = int(robot.env.sim.model.nv) if robot is not None else 0

    @property
    def compares_states(self) -> bool:
        return self.robot is not None

    def compare(self, t: int, obs: dict) -> None:
        for k, rec in self.rec_obs.items():
            d = np.asarray(obs[k], np.float64) - rec[t]
            self.obs_err[k][t] = float(np.max(np.abs(d))) if d.size else 0.0
            if k in self.pos_err:
                self.pos_err[k][t] = float(np.linalg.norm(d))
        if self.robot is not None:
            s, rec, nq, nv = (
                np.asarray(self.robot.get_sim_state()["states"], np.float64),
                self.states[t],
                self.nq,
                self.nv,
            )
            self.qpos_err[t] = float(np.max(np.abs(s[1 : 1 + nq] - rec[1 : 1 + nq])))
            self.qvel_err[t] = float(np.max(np.abs(s[1 + nq : 1 + nq + nv] - rec[1 + nq : 1 + nq + nv])))

    def report(self, tolerance: float) -> dict[str, Any]:
        """The divergence fields of the replay report. diverged: the replayed simulator state against the recorded
        one where the store has it (robosuite's recorded observations lag the recorded state by one physics
        substep, up to ~0.8 mm); else the position observations."""
        pos_any = np.nanmax(np.stack(list(self.pos_err.values())), axis=0) if self.pos_err else None
        basis = "sim_state" if self.compares_states and np.any(np.isfinite(self.qpos_err)) else "observations"
        if basis == "sim_state":
            exceed = first_true(np.nan_to_num(self.qpos_err, nan=0.0) > tolerance)
        else:
            exceed = first_true(pos_any > tolerance) if pos_any is not None else None
        worst_key = worst_step = None
        if pos_any is not None:
            worst_step = int(np.nanargmax(pos_any))
            worst_key = max(self.pos_err, key=lambda k: self.pos_err[k][worst_step])
        return {
            "compared_keys": sorted(self.rec_obs),
            "position_keys": self.pos_keys,
            "pos_err_m": step_stats(pos_any),  # max over the position keys, per step
            "pos_err_by_key_m": {k: step_stats(v) for k, v in self.pos_err.items()},
            "obs_err_max_by_key": {k: finite_or_none(np.nanmax(v)) for k, v in self.obs_err.items()},
            "qpos_err": step_stats(self.qpos_err) if self.compares_states else None,
            "qvel_err": step_stats(self.qvel_err) if self.compares_states else None,
            "max_divergence_m": finite_or_none(np.nanmax(pos_any)) if pos_any is not None else None,
            "final_divergence_m": finite_or_none(pos_any[-1]) if pos_any is not None else None,
            "max_divergence_key": worst_key,
            "max_divergence_step": worst_step,
            "first_exceed_step": exceed,
            "diverged": exceed is not None,
            "divergence_basis": basis,  # sim_state: max |qpos error| (m / rad) vs the tolerance; else positions
        }


def step_stats(a: np.ndarray | None) -> dict | None:
    if a is None or not np.any(np.isfinite(a)):
        return None
    return {
        "max": finite_or_none(np.nanmax(a)),
        "final": finite_or_none(a[-1]),
        "initial": finite_or_none(a[0]),
        "per_step": [finite_or_none(x) for x in a],
    }
