"""Residual off-policy RL on a frozen BC policy (ResFiT, Ankile et al. 2025): TD3-style updates of a small residual
actor, a LayerNorm critic ensemble, n-step returns, and RLPD's symmetric sampling (half demos, half online).

Phases, counted in online transitions (the learner's replay size):
  [0, learning_starts)                      robot runs base + uniform noise; no updates
  [learning_starts, + critic_warmup)        critic-only updates; robot explores with Gaussian noise
  afterwards                                critic every update, actor every `actor_every` updates
Hyper-parameters and the reference's values: configs/algo/residual.yaml and ../shared/reference (ResFiT §1.2-1.3).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from robot_rl.algos.base import Algorithm, WarmupPhases
from robot_rl.algos.demos import cached_base_actions, load_demos
from robot_rl.algos.ensemble import EnsembleQ, make_adamw, polyak
from robot_rl.algos.nstep import Pool, RLPDSampler
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX
from robot_rl.learner.replay_buffer import ReplayBuffer as ReplayStore  # until algos take a ReplayView
from robot_rl.policies.residual import ResidualModel, fit_to_demos, residual_obs_keys

log = logging.getLogger(__name__)


@dataclass
class ResidualConfig:
    base_checkpoint: str = ""          # frozen BC policy (training run dir or checkpoint dir)
    demos: str = ""                    # episode store of demonstrations (relabelled with the base)
    demo_episodes: int | None = None   # use at most this many successful demo episodes
    obs_keys: list | None = None       # residual/critic inputs (null: the base policy's observation keys)
    scale: float = 0.2                 # residual bound, normalised action units
    actor_hidden: list = field(default_factory=lambda: [256, 256])
    critic_hidden: list = field(default_factory=lambda: [256, 256])
    image_encoder: dict = field(default_factory=dict)  # ObsEncoder settings when obs_keys include cameras
    num_critics: int = 10
    target_heads: int = 2              # target = min over this many random heads
    gamma: float = 0.99
    n_step: int = 3
    tau: float = 0.005
    actor_lr: float = 1e-4
    critic_lr: float = 3e-4
    grad_clip: float = 1.0
    batch_size: int = 256
    demo_fraction: float = 0.5
    learning_starts: int = 1000
    critic_warmup: int = 1000
    actor_every: int = 2               # critic updates per actor update (delayed actor)
    warmup_noise: float = 0.2          # U(-x, x) on the base during the first learning_starts transitions
    explore_std: float = 0.05          # fixed Gaussian exploration afterwards
    target_noise: float = 0.05         # TD3 target smoothing
    noise_clip: float = 0.3
    min_action_range: float = 0.1
    min_obs_std: float = 0.1
    interventions_to_demos: bool = True  # takeover steps also join the demo half of each batch (HIL-SERL)
    base_device: str = "cpu"


def load_base(checkpoint: str, device: str = "cpu"):
    """The frozen base policy (eval mode, no gradients)."""
    from robot_rl.policies.checkpoint import load_policy

    if not checkpoint:
        raise ValueError("algo.base_checkpoint is required: the BC policy to improve (a `robot-rl train` run dir)")
    base = load_policy(checkpoint, device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def _to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


class ResidualTD3(WarmupPhases, Algorithm):
    @staticmethod
    def check_config(cfg: ResidualConfig) -> None:
        """Fail before any process starts when the base or the demonstrations are missing."""
        from robot_rl.policies.checkpoint import resolve_checkpoint

        if not cfg.base_checkpoint:
            raise ValueError("algo.base_checkpoint is required: the BC policy to improve (a `robot-rl train` run "
                             "dir or checkpoint dir)")
        try:
            resolve_checkpoint(cfg.base_checkpoint)
        except FileNotFoundError as e:
            raise ValueError(f"algo.base_checkpoint: {e}") from None
        if not cfg.demos:
            raise ValueError("algo.demos is required: an episode store of demonstrations (`robot-rl record`)")
        if not (Path(cfg.demos) / "commit.json").exists():
            raise ValueError(f"algo.demos={cfg.demos!r} is not an episode store (no commit.json)")
        if not 0.0 <= cfg.demo_fraction <= 1.0 or cfg.n_step < 1 or not 1 <= cfg.target_heads <= cfg.num_critics:
            raise ValueError("algo: need 0 <= demo_fraction <= 1, n_step >= 1 and 1 <= target_heads <= num_critics")

    def __init__(self, cfg: ResidualConfig, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        self.cfg, self.device = cfg, device
        self.base = load_base(cfg.base_checkpoint, cfg.base_device)
        store = EpisodeStore.open(cfg.demos, "r") if cfg.demos else None
        if store is None:
            raise ValueError("algo.demos is required: an episode store of demonstrations (half of every batch)")
        obs_features = {k[len(OBS_PREFIX):]: f for k, f in store.features.items() if k.startswith(OBS_PREFIX)}
        self.obs_keys = residual_obs_keys(obs_features, self.base, vars(cfg))
        self.action_dim = int(store.features["action"].shape[0])

        # demos: cut at success, base-relabelled, as a pool of n-step transitions
        arrays, ends = load_demos(cfg.demos, self.obs_keys, cfg.demo_episodes)
        from robot_rl.policies.checkpoint import resolve_checkpoint

        weights = resolve_checkpoint(cfg.base_checkpoint) / "model.safetensors"
        arrays["base_action"] = cached_base_actions(run_dir, cfg.demos, weights, self.base, arrays, ends,
                                                    self.obs_keys)
        self.demos = Pool.from_arrays(arrays, ends)
        self.demo_arrays = arrays

        # networks: the residual model travels to the robot; the critic stays here
        self.model = ResidualModel(obs_features, self.obs_keys, self.action_dim, vars(cfg))
        fit_to_demos(self.model, arrays, store.features["action"], cfg.scale, cfg.min_action_range, cfg.min_obs_std)
        self.model.to(device)
        self.critic = EnsembleQ(cfg.num_critics, self.model.featurizer.out_dim + self.action_dim,
                                list(cfg.critic_hidden)).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_actor = copy.deepcopy(self.model.actor).requires_grad_(False)
        self.actor_opt = make_adamw(self.model.actor.parameters(), lr=cfg.actor_lr)
        self.critic_opt = make_adamw([*self.critic.parameters(), *self.model.featurizer.parameters()],
                                            lr=cfg.critic_lr)
        self.sampler = RLPDSampler(self.demos, self.obs_keys, ["action", "base_action"], cfg.n_step, cfg.gamma,
                                   cfg.batch_size, cfg.demo_fraction, cfg.interventions_to_demos)
        self.num_updates = 0
        self.torch_rng = torch.Generator(device="cpu").manual_seed(0)

    # ------------------------------------------------------------------------------------ learner interface
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(), "target_actor": self.target_actor.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.target_actor.load_state_dict(state["target_actor"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.num_updates = int(state["num_updates"])

    def sample(self, replay: ReplayStore, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return _to_tensors(self.sampler.sample(replay, rng), self.device)

    # ---------------------------------------------------------------------------------------------- update
    def update(self, replay: ReplayStore, rng: np.random.Generator) -> dict[str, float]:
        cfg = self.cfg
        b = self.sample(replay, rng)
        norm = self.model.scaler.normalize
        obs = {k: b["obs." + k] for k in self.obs_keys}
        nxt = {k: b["next." + k] for k in self.obs_keys}
        base, next_base = norm(b["base_action"]).clamp(-1, 1), norm(b["next_base_action"]).clamp(-1, 1)
        action = norm(b["action"]).clamp(-1, 1)

        # critic: y = R_n + gamma^h * min over 2 random target heads of Q'(s_{t+h}, base' + pi'(s_{t+h}) + noise)
        with torch.no_grad():
            f_next = self.model.featurizer(nxt)
            res_next = self.target_actor(f_next, next_base)
            noise = (torch.randn_like(res_next) * cfg.target_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            a_next = (next_base + res_next + noise).clamp(-1, 1)
            heads = torch.randperm(cfg.num_critics, generator=self.torch_rng)[: cfg.target_heads].to(self.device)
            q_next = self.target_critic(f_next, a_next, heads).min(dim=0).values
            target = b["return"] + b["discount"] * q_next
        features = self.model.featurizer(obs)  # the encoder (if any) learns from the critic loss only
        q = self.critic(features, action)  # (heads, batch)
        critic_loss = F.mse_loss(q, target.expand_as(q), reduction="none").mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic_opt.param_groups[0]["params"], cfg.grad_clip)
        self.critic_opt.step()
        metrics = {"critic/loss": critic_loss.item() / cfg.num_critics, "critic/q_mean": q.mean().item(),
                   "critic/q_head_std": q.std(dim=0).mean().item(), "critic/q_max": q.max().item(),
                   "critic/target_mean": target.mean().item()}

        # actor: maximise the ensemble-mean Q of base + residual (features detached: the critic owns them)
        actor_phase = replay.size >= cfg.learning_starts + cfg.critic_warmup
        if actor_phase and self.num_updates % cfg.actor_every == 0:
            residual = self.model.actor(features.detach(), base)
            q_pi = self.critic(features.detach(), (base + residual).clamp(-1, 1)).mean(dim=0)
            actor_loss = -q_pi.mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.actor.parameters(), cfg.grad_clip)
            self.actor_opt.step()
            metrics.update({"actor/loss": actor_loss.item(), "actor/residual_abs": residual.abs().mean().item()})
            polyak(self.model.actor, self.target_actor, cfg.tau)
        polyak(self.critic, self.target_critic, cfg.tau)
        self.num_updates += 1
        metrics["phase"] = 2.0 if actor_phase else 1.0
        return metrics
