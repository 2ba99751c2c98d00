"""Online behaviour cloning (DAgger-style): regress the policy onto the expert's action at every visited state.

The control process labels every step with the teleop/expert action (`expert_action`) whoever acted, so
states the learning policy visits get labelled too — the policy improves on its own mistakes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from robot_rl.algos.base import Algorithm
from robot_rl.interfaces import OBS_PREFIX, Feature
from robot_rl.learner.replay_buffer import ReplayBuffer as ReplayStore  # until algos take a ReplayView
from robot_rl.policies.mlp import MLPPolicy


@dataclass
class OnlineBCConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    min_transitions: int = 200


def observation_features(replay: ReplayStore) -> dict[str, Feature]:
    """Recover the robot's low-dim observation features from what arrived on the wire."""
    feats = {}
    for key in replay.keys():
        if key.startswith(OBS_PREFIX):
            col = replay.column(key)
            feats[key[len(OBS_PREFIX):]] = Feature(tuple(col.shape[1:]), str(col.dtype))
    return feats


class OnlineBC(Algorithm):
    def __init__(self, cfg: OnlineBCConfig, policy_cfg: dict, device: torch.device):
        self.cfg = cfg
        self.policy_cfg = policy_cfg  # the same policy config the control process builds from
        self.device = device
        self.policy: MLPPolicy | None = None
        self.opt: torch.optim.Optimizer | None = None

    def _build(self, replay: ReplayStore) -> None:
        labels = replay.column("expert_action")
        action = Feature((labels.shape[1],))
        self.policy = MLPPolicy.from_features(
            observation_features(replay), action, self.policy_cfg["hidden"], self.policy_cfg.get("obs_keys")
        )
        self.policy.to(self.device)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.on_publish(replay)

    def ready(self, replay: ReplayStore) -> bool:
        """Enough expert-labelled steps to fit (a session without a teleop/expert never becomes ready)."""
        if self.policy is not None:
            return True
        if replay.size < self.cfg.min_transitions or "expert_action" not in replay.keys():
            return False
        if np.isfinite(replay.column("expert_action")).all(axis=1).sum() < self.cfg.min_transitions:
            return False
        self._build(replay)
        return True

    def on_publish(self, replay: ReplayStore) -> None:
        """Refresh observation and action normalisation from all data so far (stats travel with the weights)."""
        flat = self.policy.flatten({k: replay.column(OBS_PREFIX + k) for k in self.policy.obs_keys})
        self.policy.set_obs_stats(flat.mean(0).numpy(), flat.std(0).numpy())
        labels = replay.column("expert_action")
        labels = labels[np.isfinite(labels).all(axis=1)]
        if len(labels):
            lo, hi = labels.min(0), labels.max(0)
            pad = np.maximum(0.05 * (hi - lo), 1e-2)  # a little room past the demonstrated range
            self.policy.action_low.copy_(torch.as_tensor(lo - pad))
            self.policy.action_high.copy_(torch.as_tensor(hi + pad))

    def update(self, replay: ReplayStore, rng: np.random.Generator) -> dict[str, float]:
        keys = [OBS_PREFIX + k for k in self.policy.obs_keys] + ["expert_action"]
        batch = replay.sample(self.cfg.batch_size, rng, keys)
        target = torch.as_tensor(batch["expert_action"], device=self.device)
        labelled = torch.isfinite(target).all(dim=1)  # steps without an expert label carry NaN
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

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "opt": self.opt.state_dict()} if self.policy else {}

    def load_state_dict(self, state: dict) -> None:
        # networks are built lazily from the first data; the learner restores after replay is loaded
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["opt"])
