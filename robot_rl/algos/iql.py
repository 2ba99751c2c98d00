"""Implicit Q-Learning (Kostrikov, Nair, Levine 2021): the one offline IQL of robot_rl, CORL style.

Why IQL: it never queries Q at actions outside the data. V is an upper expectile of Q over the data's actions,
Q regresses onto r + γ V(s'), and a policy (optional) is extracted by advantage-weighted regression. RL-100 uses
the critics alone (to rate its diffusion policy's chunks); the VLM-feedback pipeline also extracts a policy.

    iql = IQL.build(iql_config(actor="gaussian"), obs_dim, action_dim, device)   # or IQL(cfg, nets..., opts...)
    for _ in range(cfg.steps):
        iql.update(batch)        # {obs, action, reward, next_obs, done?, discount?}: float tensors, batch first

`obs`/`next_obs` are features (B, F) the caller computed and normalised; `action` (B, A) is flat (a chunk is
flattened). Per sample, the target is `reward + discount · (1 − done) · V(next_obs)` with `discount` defaulting to
cfg.discount: chunk-level transitions pass γ^chunk. Every default: configs/algo/iql.yaml.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from importlib.resources import files

import torch
from omegaconf import OmegaConf
from torch import nn

from robot_rl.algos.ensemble import EnsembleQ, make_adam, polyak

BATCH_KEYS = ("obs", "action", "reward", "next_obs")  # required; `done` and `discount` are optional


@dataclass
class IQLConfig:
    """Every setting, its default and meaning: configs/algo/iql.yaml (the one place defaults live)."""

    expectile: float
    beta: float
    exp_adv_max: float
    tau: float
    discount: float
    q_hidden: list
    v_hidden: list
    layer_norm: bool
    critic_lr: float
    actor: str | None
    actor_hidden: list
    actor_lr: float
    log_std_min: float
    log_std_max: float
    grad_clip: float | None
    batch_size: int
    steps: int


def iql_config(**settings) -> IQLConfig:
    """configs/algo/iql.yaml with `settings` over it; an unknown setting is an error naming the known ones."""
    defaults = OmegaConf.to_container(OmegaConf.load(str(files("robot_rl.configs") / "algo" / "iql.yaml")))
    known = {f.name for f in dataclasses.fields(IQLConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"iql.{unknown[0]} is not an IQL setting; known: {sorted(known)}")
    cfg = IQLConfig(**{**defaults, **settings})
    if not 0.0 < cfg.expectile < 1.0:
        raise ValueError(f"iql.expectile must be in (0, 1), got {cfg.expectile}")
    if cfg.actor not in (None, "gaussian", "deterministic"):
        raise ValueError(f"iql.actor must be null, gaussian or deterministic, got {cfg.actor!r}")
    return cfg


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Asymmetric L2: mean of |τ − 1(u < 0)| u². τ = 0.5 is half the MSE; τ → 1 pushes V towards max Q."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff**2).mean()


def mlp(in_dim: int, hidden: list[int], out_dim: int, layer_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), *([nn.LayerNorm(width)] if layer_norm else []), nn.ReLU()]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class ValueNet(nn.Module):
    """V(s): features (B, F) -> (B,)."""

    def __init__(self, obs_dim: int, hidden: list[int], layer_norm: bool):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1, layer_norm)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class GaussianActor(nn.Module):
    """π(a|s) = N(tanh(μ(s)), exp(log_std)²): tanh on the mean, not a squashed sample (IQL's official policy; a
    squashed Gaussian hurt IQL in d3rlpy#171). Actions are expected in [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: list[int], log_std_min: float, log_std_max: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden, action_dim)
        self.log_std = nn.Parameter(torch.zeros(action_dim))
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action (evaluation)."""
        return torch.tanh(self.net(obs))

    def bc_loss(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """−log π(a|s) per sample (B,)."""
        std = self.log_std.clamp(self.log_std_min, self.log_std_max).exp()
        return -torch.distributions.Normal(self(obs), std).log_prob(action).sum(-1)


class DeterministicActor(nn.Module):
    """a = tanh(μ(s)); AWR with it is advantage-weighted MSE (CORL's deterministic IQL actor)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: list[int]):
        super().__init__()
        self.net = mlp(obs_dim, hidden, action_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def bc_loss(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Squared error per sample (B,)."""
        return ((self(obs) - action) ** 2).sum(-1)


class IQL:
    """The update rule on networks and optimisers it is handed. `q`: double Q (EnsembleQ with 2 heads:
    (features, action) -> (2, B)); `v`: (features) -> (B,); `actor` (optional): a module with `bc_loss(obs,
    action) -> (B,)`. The target Q is a copy of `q` kept by Polyak averaging."""

    def __init__(
        self,
        cfg: IQLConfig,
        q: nn.Module,
        v: nn.Module,
        q_opt: torch.optim.Optimizer,
        v_opt: torch.optim.Optimizer,
        actor: nn.Module | None = None,
        actor_opt: torch.optim.Optimizer | None = None,
    ):
        self.cfg, self.q, self.v, self.q_opt, self.v_opt = cfg, q, v, q_opt, v_opt
        self.actor, self.actor_opt = actor, actor_opt
        self.q_target = copy.deepcopy(q).requires_grad_(False)
        self.steps = 0

    @classmethod
    def build(cls, cfg: IQLConfig, obs_dim: int, action_dim: int, device: torch.device | str = "cpu") -> IQL:
        """Networks and Adam optimisers as configured (cfg.actor: none, gaussian or deterministic)."""
        q = EnsembleQ(2, obs_dim + action_dim, list(cfg.q_hidden), cfg.layer_norm).to(device)
        v = ValueNet(obs_dim, list(cfg.v_hidden), cfg.layer_norm).to(device)
        actor = None
        if cfg.actor == "gaussian":
            actor = GaussianActor(obs_dim, action_dim, list(cfg.actor_hidden), cfg.log_std_min, cfg.log_std_max)
        elif cfg.actor == "deterministic":
            actor = DeterministicActor(obs_dim, action_dim, list(cfg.actor_hidden))
        actor = actor.to(device) if actor is not None else None
        actor_opt = make_adam(actor.parameters(), cfg.actor_lr) if actor is not None else None
        q_opt, v_opt = make_adam(q.parameters(), cfg.critic_lr), make_adam(v.parameters(), cfg.critic_lr)
        return cls(cfg, q, v, q_opt, v_opt, actor, actor_opt)

    # ------------------------------------------------------------------------------------------- the update
    def _step(self, loss: torch.Tensor, net: nn.Module, opt: torch.optim.Optimizer, name: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"IQL {name} loss is {loss.item()} at update {self.steps}; weights left unchanged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), self.cfg.grad_clip)
        opt.step()

    def _update_v(self, obs, action) -> tuple[torch.Tensor, dict]:
        """V ← expectile of min(Q1, Q2)_target over the data's actions. Returns the advantage for the actor."""
        with torch.no_grad():
            target_q = self.q_target(obs, action).min(0).values
        v = self.v(obs)
        adv = target_q - v
        loss = expectile_loss(adv, self.cfg.expectile)
        self._step(loss, self.v, self.v_opt, "value")
        return adv.detach(), {"v_loss": loss.item(), "v": v.mean().item()}

    def _update_q(self, obs, action, reward, next_v, discount, done) -> dict:
        """Both Q heads regress onto r + γ (1 − done) V(s'), V(s') computed before V's update (CORL)."""
        target = reward + discount * (1.0 - done) * next_v
        q = self.q(obs, action)  # (2, B)
        loss = ((q - target.unsqueeze(0)) ** 2).mean(1).sum()
        self._step(loss, self.q, self.q_opt, "Q")
        polyak(self.q, self.q_target, self.cfg.tau)
        return {"q_loss": loss.item(), "q": q.mean().item()}

    def _update_policy(self, obs, action, adv) -> dict:
        """Advantage-weighted regression: min E[min(exp(β A), exp_adv_max) · bc_loss(s, a)]."""
        weights = torch.exp(self.cfg.beta * adv).clamp(max=self.cfg.exp_adv_max)
        loss = (weights * self.actor.bc_loss(obs, action)).mean()
        self._step(loss, self.actor, self.actor_opt, "policy")
        return {"actor_loss": loss.item(), "awr_weight": weights.mean().item()}

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One step of V, Q (+ Polyak target) and, with an actor, the policy. Non-finite input raises ValueError."""
        check_batch(batch)
        obs, action, next_obs = batch["obs"], batch["action"], batch["next_obs"]
        reward = batch["reward"].reshape(-1)
        done = batch["done"].reshape(-1).float() if "done" in batch else torch.zeros_like(reward)
        discount = batch["discount"].reshape(-1) if "discount" in batch else torch.full_like(reward, self.cfg.discount)
        with torch.no_grad():
            next_v = self.v(next_obs)
        adv, out = self._update_v(obs, action)
        out.update(self._update_q(obs, action, reward, next_v, discount, done))
        if self.actor is not None:
            out.update(self._update_policy(obs, action, adv))
        self.steps += 1
        return out

    # ------------------------------------------------------------------------------------------- using it
    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2) of the trained (not target) heads, (B,)."""
        return self.q(obs, action).min(0).values

    @torch.no_grad()
    def advantage(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q_value(obs, action) - self.v(obs)

    def fit(self, sample, steps: int | None = None, log_every: int = 0, log=None) -> dict[str, float]:
        """`steps` (default cfg.steps) updates on `sample() -> batch`; returns the mean of the last 100 updates'
        scalars. `log(step, scalars)` every `log_every` updates."""
        steps = self.cfg.steps if steps is None else steps
        tail: list[dict] = []
        for i in range(steps):
            out = self.update(sample())
            tail = [*tail[-99:], out]
            if log is not None and log_every and (i + 1) % log_every == 0:
                log(self.steps, out)
        return {k: sum(d[k] for d in tail) / len(tail) for k in tail[0]} if tail else {}

    def state_dict(self) -> dict:
        nets = {"q": self.q, "q_target": self.q_target, "v": self.v, "q_opt": self.q_opt, "v_opt": self.v_opt}
        if self.actor is not None:
            nets.update(actor=self.actor, actor_opt=self.actor_opt)
        return {"steps": self.steps, **{k: m.state_dict() for k, m in nets.items()}}

    def load_state_dict(self, state: dict) -> None:
        for k in ("q", "q_target", "v", "q_opt", "v_opt", "actor", "actor_opt"):
            if k in state and getattr(self, k) is not None:
                getattr(self, k).load_state_dict(state[k])
        self.steps = int(state["steps"])


def check_batch(batch: dict[str, torch.Tensor]) -> None:
    """Every required key present, equal batch sizes, every value finite: a NaN never reaches the weights."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"IQL batch lacks {missing}; it needs {list(BATCH_KEYS)} (+ optional done, discount)")
    n = batch["obs"].shape[0]
    for key, value in batch.items():
        if value.shape[0] != n:
            raise ValueError(f"IQL batch: {key} has {value.shape[0]} rows, obs has {n}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"IQL batch: {key} has non-finite values (NaN/inf); fix the data before training")
