"""What residual TD3 and SAC/RLPD share, written once: demonstrations as an n-step pool mixed 50/50 into every batch
(RLPD), a critic ensemble with its target copy, the warm-up phases the robot is told about, the optimiser step,
and the resume state. The update rules (losses) stay in each algorithm's file, top to bottom."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from robot_rl.algos.base import Algorithm, ReplayView
from robot_rl.algos.ensemble import EnsembleQ
from robot_rl.algos.nstep import Pool, RLPDSampler
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import OBS_PREFIX
from robot_rl.policies.residual import fit_to_demos


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto `device`. To a GPU through pinned memory with non_blocking=True: a copy from pageable memory
    makes CUDA wait for the stream first (a host-device sync on every update), a pinned one is queued behind it."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class OffPolicy(Algorithm):
    """Phases, counted in online transitions (the replay's size): the robot explores on its own ("warmup") for
    `cfg.learning_starts` transitions before any update, then as `explore_mode` says.

    A subclass sets `self.obs_keys`, builds its robot-side model (`.scaler`, `.featurizer`, `.actor`) and hands it
    to `_setup_networks`, makes its optimisers, and calls `_make_sampler`; its `update` writes the losses out.
    """

    explore_mode = "gaussian"  # exploration after the warm-up, as the robot-side policy names it
    saved = ("model", "critic", "target_critic", "actor_opt", "critic_opt")  # attributes resumed via state_dict

    @classmethod
    def check_config(cls, cfg) -> None:
        if not cfg.demos:
            raise ValueError("algo.demos is required: an episode store of demonstrations (`robot-rl record`)")
        if not (Path(cfg.demos) / "commit.json").exists():
            raise ValueError(f"algo.demos={cfg.demos!r} is not an episode store (no commit.json)")
        if not 0.0 <= cfg.demo_fraction <= 1.0 or cfg.n_step < 1 or not 1 <= cfg.target_heads <= cfg.num_critics:
            raise ValueError("algo: need 0 <= demo_fraction <= 1, n_step >= 1 and 1 <= target_heads <= num_critics")

    def __init__(self, cfg, policy_cfg: dict, device: torch.device, run_dir: Path | None = None):
        super().__init__(cfg, policy_cfg, device, run_dir)
        if not cfg.demos:
            raise ValueError("algo.demos is required: an episode store of demonstrations (half of every batch)")
        store = EpisodeStore.open(cfg.demos, "r")
        self.obs_features = {k[len(OBS_PREFIX) :]: f for k, f in store.features.items() if k.startswith(OBS_PREFIX)}
        self.action_feature = store.features["action"]
        self.action_dim = int(self.action_feature.shape[0])
        self.num_updates = 0
        self.torch_rng = torch.Generator(device="cpu").manual_seed(0)  # which critic heads form each TD target

    # ----------------------------------------------------------------------------------------------- building
    def _setup_networks(self, model: torch.nn.Module, demo_arrays: dict[str, np.ndarray], scale: float) -> None:
        """Fit the robot-side model's action scaler and observation statistics to the demonstrations (they travel
        with the weights); the critic ensemble reads its features and the action; the target starts as a copy."""
        cfg = self.cfg
        fit_to_demos(model, demo_arrays, self.action_feature, scale, cfg.min_action_range, cfg.min_obs_std)
        self.model = model.to(self.device)
        self.critic = EnsembleQ(
            cfg.num_critics, self.model.featurizer.out_dim + self.action_dim, list(cfg.critic_hidden)
        ).to(self.device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

    def _make_sampler(
        self, demo_arrays: dict[str, np.ndarray], episode_ends: np.ndarray, action_keys: list[str]
    ) -> None:
        """Batches: `demo_fraction` demonstrations (+ takeover steps), the rest online; n-step returns."""
        cfg = self.cfg
        self.demo_arrays = demo_arrays
        self.demos = Pool.from_arrays(demo_arrays, episode_ends)
        self.sampler = RLPDSampler(
            self.demos,
            self.obs_keys,
            action_keys,
            cfg.n_step,
            cfg.gamma,
            cfg.batch_size,
            cfg.demo_fraction,
            cfg.interventions_to_demos,
        )

    # ------------------------------------------------------------------------------------ pieces of an update
    def sample(self, replay: ReplayView, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One RLPD batch as tensors on the training device (to a GPU: pinned memory, asynchronous copies)."""
        return {k: to_device(torch.as_tensor(v), self.device) for k, v in self.sampler.sample(replay, rng).items()}

    def target_heads(self) -> torch.Tensor:
        """`target_heads` critic heads drawn at random for this update's TD target (the min over them)."""
        heads = torch.randperm(self.cfg.num_critics, generator=self.torch_rng)[: self.cfg.target_heads]
        return to_device(heads, self.device)

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float | None = None) -> None:
        """zero_grad, backward, optional gradient-norm clip over the optimiser's parameters, step."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], clip)
        opt.step()

    # ---------------------------------------------------------------------------------------- learner interface
    def ready(self, replay: ReplayView) -> bool:
        return replay.size >= self.cfg.learning_starts and replay.size > 0

    def trainable_transitions(self, replay: ReplayView) -> int:
        return max(0, replay.size - self.cfg.learning_starts)

    def exploration(self, replay: ReplayView) -> str:
        return "warmup" if replay.size < self.cfg.learning_starts else self.explore_mode

    def publish_meta(self, replay: ReplayView) -> dict:
        return {"exploration": self.exploration(replay)}

    def policy_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def robot_model(self) -> torch.nn.Module:
        """A CPU copy of the robot-side model with the current weights (training goes on with the original)."""
        return copy.deepcopy(self.model).cpu()

    def state_dict(self) -> dict:
        return {
            **{name: getattr(self, name).state_dict() for name in self.saved},
            "num_updates": torch.tensor(self.num_updates),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in self.saved:
            getattr(self, name).load_state_dict(state[name])
        self.num_updates = int(state["num_updates"])
