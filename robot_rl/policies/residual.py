"""Base + residual: a frozen behaviour-cloning policy plus a small learned correction (ResFiT).

The robot executes `a = denorm(clip(norm(a_base) + r, -1, 1))` with `r = gate * scale * tanh(actor(features, a_base))`.
The actor's last layer starts at zero, so before any RL the robot runs exactly the base policy, and the residual
can never move an action by more than `gate * scale` normalised units (a hard bound below the learner). The gate
in [0, 1] is set by the learner (by default it opens step by step while the robot's own episodes are not
worse than the base's, `robot_rl/algos/residual.py`) and travels inside the weights, so a robot, a checkpoint and an evaluation always
run the residual with the bound the learner trusted when it published them.

Normalised action units (`ActionScaler`): per dimension, the demonstrations' [min, max] with each half-range
widened by (1 + scale), so the base lies within +-1/(1+scale) and base + residual still fits in [-1, 1].

What travels to the robot is only the `ResidualModel` (feature normaliser/encoder + actor head + the scaler);
the base never changes. New weights are applied at base-chunk boundaries so one chunk is never corrected by two
different residuals.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import numpy as np
import torch
from torch import nn

from robot_rl.interfaces import Feature, Observation, Policy
from robot_rl.policies.encoders import ObsEncoder

EXPLORATION = ("none", "warmup", "gaussian")


class ActionScaler(nn.Module):
    """Robot action units <-> normalised units in which the residual's bound `scale` is expressed."""

    def __init__(self, action_dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(action_dim))
        self.register_buffer("half_range", torch.ones(action_dim))

    def fit(self, actions: np.ndarray, scale: float, min_range: float, low=None, high=None) -> None:
        lo, hi = actions.min(0), actions.max(0)
        half = np.maximum((hi - lo) / 2, min_range / 2) * (1.0 + scale)
        center = (hi + lo) / 2
        if low is not None and high is not None:  # never reach past what the robot accepts
            lo_b, hi_b = np.asarray(low, np.float64), np.asarray(high, np.float64)
            finite = np.isfinite(lo_b) & np.isfinite(hi_b)
            half = np.where(finite, np.minimum(half, (hi_b - lo_b) / 2), half)
            center = np.where(finite, np.clip(center, lo_b + half, hi_b - half), center)
        self.center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.half_range.copy_(torch.as_tensor(half, dtype=torch.float32))

    def normalize(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.center) / self.half_range

    def denormalize(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.half_range + self.center


class Featurizer(nn.Module):
    """Observation dict -> feature vector: standardised low-dim keys, plus a conv encoder per camera.

    Low-dim statistics are buffers (they travel with the weights). Images arrive as uint8 (B, H, W, C)."""

    def __init__(self, lowdim: Mapping[str, int], images: Mapping[str, tuple[int, int, int]], image_cfg: dict):
        super().__init__()
        self.lowdim_keys, self.image_keys = list(lowdim), list(images)
        dim = int(sum(lowdim.values()))
        self.register_buffer("obs_mean", torch.zeros(dim))
        self.register_buffer("obs_std", torch.ones(dim))
        self.encoder = ObsEncoder({}, images, **image_cfg) if self.image_keys else None
        self.out_dim = dim + (self.encoder.out_dim if self.encoder is not None else 0)

    def fit(self, lowdim: np.ndarray, min_std: float) -> None:
        self.obs_mean.copy_(torch.as_tensor(lowdim.mean(0), dtype=torch.float32))
        self.obs_std.copy_(torch.as_tensor(np.maximum(lowdim.std(0), min_std), dtype=torch.float32))

    def lowdim(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [obs[k].float().reshape(obs[k].shape[0], -1) for k in self.lowdim_keys]
        return torch.cat(parts, dim=-1)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [(self.lowdim(obs) - self.obs_mean) / self.obs_std] if self.lowdim_keys else []
        if self.encoder is not None:
            images = {k: obs[k].permute(0, 3, 1, 2).float() / 255.0 for k in self.image_keys}
            parts.append(self.encoder(images))
        return torch.cat(parts, dim=-1)


def mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ResidualActor(nn.Module):
    """(features, normalised base action) -> residual in [-gate * scale, gate * scale]; zero at initialisation.

    `propose` is the un-gated residual the learner improves; `forward` is what the robot executes. The gate is a
    buffer (it travels with the weights); weights saved before it existed load as fully open (gate 1). `epoch`
    numbers the learner's gate settings (the outcome gate's levels): the robot reports it with every step, so the
    learner knows which setting each episode's outcome belongs to (weights without it: epoch 0)."""

    def __init__(self, feature_dim: int, action_dim: int, hidden: list[int], scale: float, gate: float = 1.0):
        super().__init__()
        self.net = mlp(feature_dim + action_dim, hidden, action_dim)
        nn.init.zeros_(self.net[-1].weight)  # start exactly at the base policy
        nn.init.zeros_(self.net[-1].bias)
        self.scale = float(scale)
        self.register_buffer("gate", torch.full((1,), float(gate)))
        self.register_buffer("epoch", torch.zeros(1, dtype=torch.int64))

    def propose(self, features: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.tanh(self.net(torch.cat([features, base_norm], dim=-1)))

    def forward(self, features: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
        return self.gate * self.propose(features, base_norm)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "gate", torch.ones(1))  # older weights: no gate, the full bound
        state_dict.setdefault(prefix + "epoch", torch.zeros(1, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ResidualModel(nn.Module):
    """Everything the robot needs to compute the residual: the scaler, the featurizer and the actor head."""

    def __init__(self, obs_features: Mapping[str, Feature], obs_keys: list[str], action_dim: int, cfg: Mapping):
        super().__init__()
        missing = [k for k in obs_keys if k not in obs_features]
        if missing:
            raise ValueError(f"residual obs_keys {missing} are not observations; available: {sorted(obs_features)}")
        lowdim = {k: int(np.prod(obs_features[k].shape)) for k in obs_keys if not obs_features[k].is_image}
        images = {k: tuple(obs_features[k].shape) for k in obs_keys if obs_features[k].is_image}
        self.scaler = ActionScaler(action_dim)
        self.featurizer = Featurizer(lowdim, images, dict(cfg.get("image_encoder") or {}))
        gate = cfg.get("gate_init", 1.0)  # the learner's starting gate; a checkpoint's own value comes in its weights
        self.actor = ResidualActor(self.featurizer.out_dim, action_dim, list(cfg["actor_hidden"]), cfg["scale"], gate)
        self.obs_keys = list(obs_keys)
        # what a checkpoint needs to rebuild this module (robot_rl/policies/checkpoint.py)
        self.config = {
            "obs_keys": list(obs_keys),
            "action_dim": int(action_dim),
            "actor_hidden": list(cfg["actor_hidden"]),
            "image_encoder": dict(cfg.get("image_encoder") or {}),
            "scale": float(cfg["scale"]),
        }
        self.obs_features = {k: obs_features[k] for k in obs_keys}

    def forward(self, obs: Mapping[str, torch.Tensor], base_norm: torch.Tensor) -> torch.Tensor:
        return self.actor(self.featurizer(obs), base_norm)


def fit_to_demos(
    model: nn.Module,
    arrays: Mapping[str, np.ndarray],
    action: Feature,
    scale: float,
    min_action_range: float,
    min_obs_std: float,
) -> None:
    """Action scaler and low-dim observation statistics of a robot-side model (`.scaler`, `.featurizer`) from the
    demonstrations (`obs.<k>` and `action` arrays); they travel with the weights."""
    model.scaler.fit(arrays["action"], scale, min_action_range, action.low, action.high)
    keys = model.featurizer.lowdim_keys
    if keys:
        lowdim = model.featurizer.lowdim({k: torch.as_tensor(arrays["obs." + k]) for k in keys})
        model.featurizer.fit(lowdim.numpy(), min_obs_std)


def residual_obs_keys(obs_features: Mapping[str, Feature], base_policy, cfg: Mapping) -> list[str]:
    """The residual sees the configured keys, else the base policy's own observation keys."""
    if cfg.get("obs_keys"):
        return list(cfg["obs_keys"])
    keys = list(getattr(base_policy, "obs_keys", []) or [])
    return keys or sorted(k for k, f in obs_features.items() if not f.is_image and len(f.shape) == 1)


def steps_left_in_chunk(policy) -> int:
    """How many queued actions of the current chunk remain (0 = the next call starts a new chunk)."""
    fn = getattr(policy, "steps_left_in_chunk", None)
    return int(fn()) if callable(fn) else 0


class LearnerExploration:
    """Robot side of an off-policy learner: acts from the first tick, explores as the learner's weight meta says
    (`exploration`: "warmup" until the learner's first switch), never probed (a probe would draw exploration
    noise or advance a chunk), exploration "none" while evaluating."""

    acts_without_weights = True
    probe_after_load = False
    exploration = "warmup"

    def apply_meta(self, meta: dict) -> None:
        self.exploration = meta.get("exploration", self.exploration)

    @contextlib.contextmanager
    def evaluating(self, mode: str):
        saved, self.exploration = self.exploration, "none"
        try:
            yield
        finally:
            self.exploration = saved


class ResidualPolicy(LearnerExploration, Policy):
    """The control-process side: frozen base + current residual, with the exploration the learner asks for.
    Evaluation compares "base" (the base alone, evaluated once: it is frozen) with "residual" (base + residual)."""

    eval_modes = ("base", "residual")
    eval_once = ("base",)

    def __init__(
        self,
        base,
        model: ResidualModel,
        seed: int = 0,
        warmup_noise: float = 0.2,
        explore_std: float = 0.05,
        noise_clip: float = 0.3,
        test_every: int = 0,
    ):
        self.base, self.model = base, model.eval()
        self.warmup_noise, self.explore_std, self.noise_clip = warmup_noise, explore_std, noise_clip
        # every `test_every`-th episode runs without exploration noise (the outcome gate's test episodes; 0: none)
        self.test_every, self.episodes, self.testing = int(test_every), 0, False
        self.exploration = "warmup"  # until the learner says otherwise (weights meta)
        self.use_residual = True  # False: the base alone (evaluation of the base)
        self.rng = np.random.default_rng(seed)
        self._pending: dict | None = None
        self.last_base: np.ndarray | None = None
        self.last_residual: np.ndarray | None = None  # executed (gated) actor output, normalised units, before noise
        self.last_epoch = np.int64(-1)  # the gate setting (learner's epoch) the last action ran under

    # --- weights ----------------------------------------------------------------------------------------
    def load_state_dict(self, state: dict) -> None:
        """Stage new residual weights; they take effect at the next base-chunk boundary."""
        self._pending = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}
        if steps_left_in_chunk(self.base) == 0:
            self._apply_pending()

    def _apply_pending(self) -> None:
        if self._pending is not None:
            self.model.load_state_dict(self._pending)
            self._pending = None

    def state_dict(self) -> dict:
        return self.model.state_dict()

    # --- control-process interface ----------------------------------------------------------------------
    def transition_extras(self, acted: bool) -> dict[str, np.ndarray]:
        """The critic needs the base action at every state; the residual (before noise) is logged; the gate's epoch
        tells the learner which gate setting the step ran under (-1: the policy did not act), `gate_test` whether
        it was a noise-free test episode."""
        test = np.bool_(self.testing)
        if not acted:
            nan = np.full(self.model.scaler.center.shape[0], np.nan, dtype=np.float32)
            return {"base_action": nan, "residual": nan, "gate_epoch": np.int64(-1), "gate_test": test}
        return {
            "base_action": self.last_base,
            "residual": self.last_residual,
            "gate_epoch": self.last_epoch,
            "gate_test": test,
        }

    @contextlib.contextmanager
    def evaluating(self, mode: str):
        """Exploration off; mode "base" switches the residual off."""
        saved = self.use_residual
        self.use_residual = mode != "base"
        try:
            with super().evaluating(mode):
                yield
        finally:
            self.use_residual = saved

    # --- acting -----------------------------------------------------------------------------------------
    def seed_episode(self, seed: int) -> None:
        """Seed the base's sampling noise (a diffusion base samples) and the exploration noise for one episode,
        so evaluation episodes of the base alone and of base + residual start from identical noise."""
        if hasattr(self.base, "generator"):
            self.base.generator = torch.Generator().manual_seed(int(seed))
        self.rng = np.random.default_rng(int(seed))

    def reset(self) -> None:
        self.base.reset()  # a chunked base must not carry a queue across episodes (ResFiT issue #5)
        self._apply_pending()
        self.testing = self.test_every > 0 and self.episodes % self.test_every == self.test_every - 1
        self.episodes += 1

    @torch.no_grad()
    def select_action(self, observation: Observation) -> np.ndarray:
        if steps_left_in_chunk(self.base) == 0:
            self._apply_pending()
        base = np.asarray(self.base.select_action(observation), dtype=np.float32)
        self.last_base = base
        self.last_epoch = np.int64(self.model.actor.epoch.item())
        scaler = self.model.scaler
        base_norm = scaler.normalize(torch.as_tensor(base)).unsqueeze(0)
        if not self.use_residual:
            self.last_residual = np.zeros_like(base)
            return base
        obs = {k: torch.as_tensor(np.asarray(observation[k])).unsqueeze(0) for k in self.model.obs_keys}
        residual = self.model(obs, base_norm)[0].numpy()
        self.last_residual = residual.astype(np.float32)
        explore = "none" if self.testing else self.exploration  # a test episode: the policy as deployed
        if explore == "warmup":
            residual = residual + self.rng.uniform(-self.warmup_noise, self.warmup_noise, residual.shape)
        elif explore == "gaussian":
            noise = np.clip(self.rng.normal(0.0, self.explore_std, residual.shape), -self.noise_clip, self.noise_clip)
            residual = residual + noise
        total = torch.clamp(base_norm[0] + torch.as_tensor(residual, dtype=torch.float32), -1.0, 1.0)
        return scaler.denormalize(total).numpy().astype(np.float32)
