"""The robot side of online RL through the denoising chain (RL-100 §1.8, algo=rl100_online).

A diffusion policy that samples every chunk with the stochastic DDIM chain (η = 1, σ clipped) and keeps what the
learner needs to re-score it: the chain x_K..x_0 (normalised, flat), the log-probs of each denoising step summed
over the executed rows of the chunk, the chunk's index within the episode and the weights version that sampled
it. `transition_extras` sends them with the chunk's first step and NaN on the other steps (same keys every tick).

Weights and their version (the learner's `policy_version` in the weights meta) are staged and applied together at
the next chunk boundary, so a chunk is always sampled, executed and tagged with one version. Evaluation blocks
(`evaluating`) run the sampler the learner's checkpoints deploy (`deploy_sampling`): mode "chain" (the η chain
PPO trains, seeded per episode) or mode "ddim" (deterministic DDIM η = 0 from the same seeded noise); with
`eval_chain` the other one too, as a second mode.
"""

from __future__ import annotations

import contextlib
from collections import deque

import numpy as np
import torch

from robot_rl.interfaces import Observation, Policy
from robot_rl.policies.diffusion import DiffusionPolicy

# wire keys this policy adds to every transition
CHAIN, CHAIN_LOGP, CHUNK_INDEX, CHAIN_VERSION = "chain", "chain_logp", "chunk_index", "chain_version"


class ChainSamplerPolicy(Policy):
    """Samples each chunk through the stochastic chain and reports it. Acts from the first tick (the base)."""

    acts_without_weights = True
    probe_after_load = False  # a probe would draw chain noise and advance a chunk
    device = property(lambda self: torch.device("cpu"))  # the robot samples on the CPU (its generator lives there)

    def __init__(
        self,
        policy: DiffusionPolicy,
        steps: int | None,
        eta: float,
        std_min: float,
        std_max: float | None,
        seed: int,
        deploy_sampling: str,
        eval_chain: bool,
    ):
        self.policy = policy.eval()
        # evaluation blocks: the deployed sampler first; eval_chain adds the other one
        other = {"chain": "ddim", "ddim": "chain"}[deploy_sampling]
        self.eval_modes = (deploy_sampling, other) if eval_chain else (deploy_sampling,)
        self.steps = int(steps or policy.cfg.num_inference_steps or policy.cfg.num_train_timesteps)
        self.eta, self.std_min, self.std_max = float(eta), float(std_min), std_max
        self.generator = torch.Generator().manual_seed(int(seed))
        self.version = 0  # the base from its checkpoint is version 0
        self.deterministic = False  # evaluation blocks: DDIM eta 0
        self._pending: tuple[dict | None, int | None] = (None, None)
        self._obs: deque = deque(maxlen=policy.cfg.obs_horizon)
        self._actions: deque = deque()
        self._chunk_index = -1
        self._started: dict[str, np.ndarray] | None = None  # extras of a chunk that started this tick
        chain_len = (self.steps + 1) * policy.cfg.action_horizon * policy.action_dim
        self._nan = {
            CHAIN: np.full(chain_len, np.nan, np.float32),
            CHAIN_LOGP: np.full(self.steps, np.nan, np.float32),
            CHUNK_INDEX: np.float32(np.nan),
            CHAIN_VERSION: np.float32(np.nan),
        }

    # --- weights: staged with their version, applied at a chunk boundary -----------------------------------
    def load_state_dict(self, state: dict) -> None:
        self._pending = ({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, self._pending[1])
        self._apply_at_boundary()

    def apply_meta(self, meta: dict) -> None:
        if "policy_version" in meta:
            self._pending = (self._pending[0], int(meta["policy_version"]))
        self._apply_at_boundary()

    def _apply_at_boundary(self) -> None:
        if self._actions:
            return
        state, version = self._pending
        if state is not None:
            self.policy.load_state_dict(state)
        if version is not None:
            self.version = version
        self._pending = (None, None)

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    # --- control-process interface ------------------------------------------------------------------------
    def seed_episode(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))

    def reset(self) -> None:
        self._obs.clear()
        self._actions.clear()
        self._chunk_index = -1
        self._started = None
        self._apply_at_boundary()

    def steps_left_in_chunk(self) -> int:
        return len(self._actions)

    def transition_extras(self, acted: bool) -> dict[str, np.ndarray]:
        """The chain, its per-step log-probs, chunk index and version at a chunk's first step; NaN otherwise."""
        out = self._started if acted and self._started is not None else self._nan
        self._started = None
        return dict(out)

    @contextlib.contextmanager
    def evaluating(self, mode: str):
        """Mode "ddim": deterministic DDIM (eta 0) from the episode's seeded noise; "chain": the eta=1 chain,
        seeded the same way (nothing is sent to the learner in either)."""
        saved, self.deterministic = self.deterministic, mode != "chain"
        try:
            yield
        finally:
            self.deterministic = saved

    # --- acting -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, window: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(chunk (Ha, A) normalised, per-step log-probs summed over the executed rows (K,) or None, chain
        (K+1, Ha, A)) for one observation window; deterministic DDIM (eta 0) while evaluating."""
        pol = self.policy
        cond = pol.encode_obs(window)
        if self.deterministic:
            x = torch.randn((1, pol.cfg.action_horizon, pol.action_dim), generator=self.generator)
            for step in pol.chain_schedule(self.steps, eta=0.0):
                x, _ = pol.chain_step(x, cond, step, 0.0, 0.0)
            return x[0], None, x
        chain, lp = pol.sample_chain(cond, self.steps, self.eta, self.std_min, self.std_max, generator=self.generator)
        return chain[0, -1], lp[0, :, pol.executed_rows()].sum((-2, -1)), chain[0]

    @torch.no_grad()
    def select_action(self, observation: Observation) -> np.ndarray:
        pol = self.policy
        obs = {k: torch.as_tensor(np.array(observation[k])) for k in pol.obs_keys}
        self._obs.extend([obs] * (pol.cfg.obs_horizon if not self._obs else 1))
        if not self._actions:
            self._apply_at_boundary()
            window = {k: torch.stack([o[k] for o in self._obs])[None] for k in pol.obs_keys}
            chunk, logp, chain = self.sample(window)
            actions = pol.normalizer.unnormalize("action", chunk[None])[0, pol.executed_rows()]
            self._actions.extend(actions.cpu().numpy().astype(np.float32))
            self._chunk_index += 1
            if logp is not None:
                self._started = {
                    CHAIN: chain.reshape(-1).cpu().numpy().astype(np.float32),
                    CHAIN_LOGP: logp.cpu().numpy().astype(np.float32),
                    CHUNK_INDEX: np.float32(self._chunk_index),
                    CHAIN_VERSION: np.float32(self.version),
                }
        return self._actions.popleft()


def chain_length(policy: DiffusionPolicy, steps: int | None) -> int:
    """Floats of one flat chain x_K..x_0 on the wire."""
    k = int(steps or policy.cfg.num_inference_steps or policy.cfg.num_train_timesteps)
    return (k + 1) * policy.cfg.action_horizon * policy.action_dim
