"""Online behaviour cloning (DAgger-style): regress the policy onto the expert's action at every visited state.

The control process labels every step with the teleop/expert action (`expert_action`) whoever acted, so
states the learning policy visits get labelled too — the policy improves on its own mistakes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robot_rl.algos.base import Algorithm, ReplayView
from robot_rl.config import ConfigError
from robot_rl.interfaces import OBS_PREFIX, Feature, Policy, Robot
from robot_rl.policies.checkpoint import build_policy
from robot_rl.policies.mlp import MLPPolicy

ACTION_RANGE_PAD = 0.05  # the action bounds reach this fraction of the demonstrated range past it ...
MIN_ACTION_PAD = 1e-2  # ... and at least this much


@dataclass
class OnlineBCConfig:
    """Every setting, its default and meaning: configs/algo/online_bc.yaml (the one place defaults live)."""

    lr: float
    weight_decay: float
    batch_size: int
    min_transitions: int
    labels: str  # "all" (DAgger: every visited step) | "interventions" (HG-DAgger: only the steps the expert drove)


def observation_features(replay: ReplayView) -> dict[str, Feature]:
    """Recover the robot's low-dim observation features from what arrived on the wire."""
    feats = {}
    for key in replay.keys():
        if key.startswith(OBS_PREFIX):
            col = replay.column(key)
            feats[key[len(OBS_PREFIX) :]] = Feature(tuple(col.shape[1:]), str(col.dtype))
    return feats


def labelled_rows(replay: ReplayView | dict, labels: str) -> np.ndarray:
    """Bool per row: an expert label to regress on (finite `expert_action`; with labels=interventions only where
    the expert drove, i.e. HG-DAgger's takeover steps). `replay`: the replay view or a sampled batch."""
    get = replay.column if hasattr(replay, "column") else replay.__getitem__
    ok = np.isfinite(get("expert_action")).all(axis=1)
    if labels == "interventions":
        ok &= np.asarray(get("intervention"), dtype=bool)
    return ok


class OnlineBC(Algorithm):
    @classmethod
    def check_config(cls, cfg: OnlineBCConfig) -> None:
        if cfg.labels not in ("all", "interventions"):
            raise ValueError(f"algo.labels={cfg.labels!r}: all (DAgger) or interventions (HG-DAgger)")

    @classmethod
    def build_robot_policy(cls, cfg: OnlineBCConfig, policy_cfg: dict, robot: Robot, seed: int) -> Policy:
        """The session's `policy:` (from the robot's features); it waits for the learner's first weights."""
        try:
            return build_policy(policy_cfg, robot.observation_features, robot.action_feature)
        except ValueError as e:
            raise ConfigError(f"policy: {e}") from None

    def __init__(self, cfg: OnlineBCConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)  # policy_cfg: the config the control process builds from
        self.policy: MLPPolicy | None = None
        self.opt: torch.optim.Optimizer | None = None

    def _build(self, replay: ReplayView) -> None:
        labels = replay.column("expert_action")
        action = Feature((labels.shape[1],))
        self.policy = MLPPolicy.from_features(
            observation_features(replay), action, self.policy_cfg["hidden"], self.policy_cfg.get("obs_keys")
        )
        self.policy.to(self.device)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.on_publish(replay)

    def ready(self, replay: ReplayView) -> bool:
        """Enough expert-labelled steps to fit (a session without a teleop/expert never becomes ready)."""
        if self.policy is not None:
            return True
        if replay.size < self.cfg.min_transitions or "expert_action" not in replay.keys():
            return False
        if labelled_rows(replay, self.cfg.labels).sum() < self.cfg.min_transitions:
            return False
        self._build(replay)
        return True

    def on_publish(self, replay: ReplayView) -> None:
        """Refresh observation and action normalisation from all data so far (stats travel with the weights)."""
        flat = self.policy.flatten({k: replay.column(OBS_PREFIX + k) for k in self.policy.obs_keys})
        self.policy.set_obs_stats(flat.mean(0).numpy(), flat.std(0).numpy())
        labels = replay.column("expert_action")
        labels = labels[labelled_rows(replay, self.cfg.labels)]
        if len(labels):
            lo, hi = labels.min(0), labels.max(0)
            pad = np.maximum(ACTION_RANGE_PAD * (hi - lo), MIN_ACTION_PAD)  # a little room past the demonstrated range
            self.policy.action_low.copy_(torch.as_tensor(lo - pad))
            self.policy.action_high.copy_(torch.as_tensor(hi + pad))

    def update(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, float]:
        keys = [OBS_PREFIX + k for k in self.policy.obs_keys] + ["expert_action"]
        keys += ["intervention"] if self.cfg.labels == "interventions" else []
        batch = replay.sample(self.cfg.batch_size, rng, keys)
        target = torch.as_tensor(batch["expert_action"], device=self.device)
        # steps without an expert label carry NaN; HG-DAgger keeps only the steps the expert drove
        labelled = torch.as_tensor(labelled_rows(batch, self.cfg.labels), device=self.device)
        if not labelled.any():
            return {"bc/labelled_fraction": 0.0}
        obs = self.policy.flatten({k: batch[OBS_PREFIX + k] for k in self.policy.obs_keys}).to(self.device)

        pred = self.policy(obs[labelled])
        loss = ((pred - target[labelled]) ** 2).mean()  # plain regression onto the expert's action

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"bc/loss": loss.item(), "bc/labelled_fraction": float(labelled.float().mean())}

    def policy_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def robot_policy(self) -> MLPPolicy:
        return copy.deepcopy(self.policy).cpu().eval()

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict()} if self.policy else {}

    def load_state_dict(self, state: dict) -> None:
        # networks are built lazily from the first data; the learner restores after replay is loaded
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
