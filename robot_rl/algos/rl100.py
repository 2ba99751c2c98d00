"""RL-100 (Lei et al. 2025, arXiv 2510.14830), part 1: iterative offline RL on a diffusion policy, gated by OPE.

A diffusion policy cloned from demonstrations is improved between rounds without touching the robot:

1. **Chunk-level transitions** over the frozen encoder's features: z_t = encode(o_{t-To+1..t}), the executed
   chunk a_t..a_{t+n-1} (normalised, flat), R_t = Σ_i γ^i r_{t+i}, z_{t+n}, discount γ^n, done at the episode's
   end (its first success step with the sparse success reward).
2. **Critics**: the shared IQL (robot_rl/algos/iql.py) on those transitions: Q(z, chunk) and V(z).
3. **Latent dynamics** (robot_rl/algos/latent_dynamics.py) for the **AM-Q** estimate (robot_rl/algos/ope.py).
4. **PPO over the denoising chain**: at dataset states, fresh chains x_K..x_0 from π_old (DDIM η=1, σ clipped),
   A = min(Q1,Q2)(z, x_0) − V(z) normalised over the batch, and per denoising step k
       r_k  = exp(Σ_chunk [log π_θ(x_{k−1}|x_k, z) − log π_old(x_{k−1}|x_k, z)])
       KL_k = Σ_chunk (μ_θ(x_k, z) − μ_BC(x_k, z))² / 2σ̃_k²       KL(π_θ || π_BC) of the step (same σ̃_k)
       L_k  = −mean_B min(r_k A, clip(r_k, 1 − c, 1 + c) A) + β mean_B KL_k      one optimiser step per k (RL-100)
   with a small LR decayed linearly to zero and gradient clipping; only the UNet learns (encoder frozen). The KL
   term anchors every round to the BC init: without it PPO walks the chunks off the data, where the critic is
   wrong and grows with the distance (measured on Lift: docs/rl100.md).
5. **The gate**: the round's candidate replaces the best policy only if
       AM-Q(candidate) ≥ AM-Q(best) + δ·|AM-Q(best)|
   both estimated with this round's critics and model on the same start states and noise; otherwise the best
   policy stays (the candidate is kept for the report only). The released code never reverts; this does.

The rounds, collection, resume and the report are robot_rl/commands/rl100.py; settings and defaults:
configs/rl100.yaml; docs/rl100.md.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from robot_rl.algos.iql import IQL, IQLConfig, iql_config
from robot_rl.algos.latent_dynamics import DynamicsConfig, EnsembleDynamics
from robot_rl.algos.ope import am_q, bootstrap_ci
from robot_rl.interfaces import OBS_PREFIX, Policy
from robot_rl.policies.diffusion import DiffusionPolicy

# ------------------------------------------------------------------------------------------------- config


@dataclass
class ChainConfig:
    steps: int  # K DDIM steps of the chain (PPO, collection)
    eta: float
    std_min: float
    std_max: float | None


@dataclass
class PPOConfig:
    iterations: int
    batch_size: int  # chains per iteration
    epochs: int
    lr: float
    clip: float
    grad_clip: float
    chains_per_state: int  # M > 1: A = Q(z, a_i) - mean_j Q(z, a_j) over M chains at the same state
    kl_coef: float  # weight of KL(π_θ || π_ref) per denoising step at the chain's states


@dataclass
class OPEConfig:
    start_states: int
    horizon: int
    bootstrap: int
    seed: int


@dataclass
class RL100Config:
    """Every setting, its default and meaning: configs/rl100.yaml (`rl100.algo`, `rl100.iql`)."""

    gamma: float
    reward_key: str | None
    gate: bool
    gate_delta: float
    seed: int
    chain: ChainConfig
    ppo: PPOConfig
    ope: OPEConfig
    dynamics: DynamicsConfig
    iql: IQLConfig

    @classmethod
    def from_dict(cls, algo: dict, iql: dict) -> RL100Config:
        """From the `rl100.algo` and `rl100.iql` sections; a missing or unknown key raises, naming it."""

        def build(kind, d: dict, where: str):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown, missing = sorted(set(d) - names), sorted(names - set(d))
            if unknown or missing:
                bad = f"{where}.{(unknown or missing)[0]}"
                raise ValueError(f"{bad} is {'not a setting' if unknown else 'missing'}; settings: {sorted(names)}")
            return kind(**d)

        nested = {"chain": ChainConfig, "ppo": PPOConfig, "ope": OPEConfig, "dynamics": DynamicsConfig}
        algo = dict(algo)
        parts = {k: build(kind, dict(algo.pop(k, {})), f"rl100.algo.{k}") for k, kind in nested.items()}
        return build(cls, {**algo, **parts, "iql": iql_config(**dict(iql))}, "rl100.algo")


# -------------------------------------------------------------------------------- chunk-level transitions


def flat_executed(policy: DiffusionPolicy, chunk: torch.Tensor) -> torch.Tensor:
    """(B, Ha, A) normalised chunk -> (B, n * A): the critic's action."""
    return chunk[:, policy.executed_rows()].flatten(1)


def episode_rewards(store, reward_key: str | None) -> list[tuple[int, int, np.ndarray]]:
    """(start, end, per-step reward) of every episode, cut at the first success with the sparse success reward
    (reward_key None: 1 at the first `success` step, which ends the episode) or a reward column (feature or
    derived column). Raises ValueError when the store carries no such signal."""
    if reward_key is None:
        if "success" not in store.features:
            raise ValueError(
                f"{store.path} has no `success` column and rl100.algo.reward_key is not set: there is no reward "
                f"signal; record with success labels or add a reward column (a derived column) and name it"
            )
        signal = store.array("success").astype(bool)
    elif reward_key in store.features:
        signal = store.array(reward_key).astype(np.float32)
    elif reward_key in store.derived_columns():
        signal = store.derived(reward_key).astype(np.float32)
    else:
        raise ValueError(
            f"rl100.algo.reward_key={reward_key!r} is neither a column nor a derived column of {store.path}"
        )
    out = []
    for i in range(store.num_episodes):
        a, b = store.episode_bounds(i)
        if reward_key is None:
            hits = np.flatnonzero(signal[a:b])
            b = a + int(hits[0]) + 1 if len(hits) else b
            r = np.zeros(b - a, np.float32)
            r[-1] = float(len(hits) > 0)
        else:
            r = signal[a:b].reshape(b - a)
        out.append((a, b, r))
    return out


@torch.no_grad()
def encode_store(policy: DiffusionPolicy, store, batch: int = 2048) -> torch.Tensor:
    """Features z_t of every step of `store` (N, C) with the policy's frozen encoder (eval mode): the window of
    To observations ending at t, the episode's first one repeated before its start."""
    to = policy.cfg.obs_horizon
    ends = store.episode_ends
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    ep = np.repeat(np.arange(len(ends)), np.diff(np.concatenate([[0], ends])))
    rows = np.arange(store.num_steps)[:, None] + np.arange(-to + 1, 1)[None]
    rows = np.maximum(rows, starts[ep][:, None])
    data = {k: store.array(OBS_PREFIX + k) for k in policy.obs_keys}
    was = policy.training
    policy.eval()
    try:
        out = [
            policy.encode_obs({k: torch.as_tensor(v[rows[i : i + batch]]) for k, v in data.items()})
            for i in range(0, len(rows), batch)
        ]
    finally:
        policy.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def chunk_transitions(stores: list, policy: DiffusionPolicy, cfg: RL100Config) -> dict[str, np.ndarray]:
    """Chunk-level transitions of every step of every store (stride 1): obs, action, reward, next_obs, done,
    discount (γ^n), numpy float32. The episode's end is terminal (a success, or the time limit)."""
    n = policy.cfg.n_action_steps
    parts: dict[str, list] = {k: [] for k in ("obs", "action", "reward", "next_obs", "done", "discount")}
    for store in stores:
        z = encode_store(policy, store).cpu().numpy()
        raw = torch.as_tensor(store.array("action"), device=policy.device)
        actions = policy.normalizer.normalize("action", raw).cpu().numpy()
        for a, b, r in episode_rewards(store, cfg.reward_key):
            t = np.arange(a, b)
            steps = t[:, None] + np.arange(n)[None]  # the chunk's rows, the last row repeated past the end
            parts["action"].append(actions[np.minimum(steps, b - 1)].reshape(len(t), -1))
            disc = cfg.gamma ** np.arange(n)
            r_pad = np.concatenate([r, np.zeros(n, np.float32)])
            parts["reward"].append((r_pad[steps - a] * disc).sum(1))
            parts["obs"].append(z[t])
            parts["next_obs"].append(z[np.minimum(t + n, b - 1)])
            parts["done"].append((t + n >= b).astype(np.float32))
            parts["discount"].append(np.full(len(t), cfg.gamma**n, np.float32))
    out = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    if not out["reward"].any():
        raise ValueError(
            "no episode of the data has a success or a non-zero reward: the critics would learn nothing; "
            "add successful episodes (or a reward column) to the data"
        )
    return out


# ---------------------------------------------------------------------------------------------- critics


def fit_critics(data: dict[str, np.ndarray], cfg: RL100Config, device, log=None) -> IQL:
    """IQL critics on the chunk transitions (uniform minibatches, seeded)."""
    torch.manual_seed(cfg.seed)
    iql = IQL.build(cfg.iql, data["obs"].shape[1], data["action"].shape[1], device)
    t = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
    rng = np.random.default_rng(cfg.seed)
    n = len(data["obs"])

    def sample() -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(rng.integers(0, n, cfg.iql.batch_size), device=device)
        return {k: v[idx] for k, v in t.items()}

    iql.fit(sample, cfg.iql.steps, log_every=1000, log=log)
    return iql


def fit_dynamics(data: dict[str, np.ndarray], cfg: RL100Config, device, log=None) -> tuple[EnsembleDynamics, dict]:
    torch.manual_seed(cfg.seed)
    d = cfg.dynamics
    model = EnsembleDynamics(data["obs"].shape[1], data["action"].shape[1], d.members, d.elites, list(d.hidden))
    model = model.to(device)
    info = model.fit({k: data[k] for k in ("obs", "action", "next_obs", "reward", "done")}, d, cfg.seed, log)
    return model.eval(), info


# -------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def ddim_chunks(
    policy: DiffusionPolicy, z: torch.Tensor, generator: torch.Generator, steps: int | None
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) chunks from seeded noise: what a deployed policy does. (B, Ha, A) normalised."""
    shape = (z.shape[0], policy.cfg.action_horizon, policy.action_dim)
    return policy.denoise(torch.randn(shape, generator=generator).to(z.device), z, steps, "ddim")


def ope_estimate(policy: DiffusionPolicy, critics: IQL, dynamics, z0: torch.Tensor, cfg: RL100Config) -> dict:
    """AM-Q of `policy` from the start features z0: mean, bootstrap 95 % interval, per-state values."""
    values = am_q(
        lambda z, g: flat_executed(policy, ddim_chunks(policy, z, g, cfg.chain.steps)),
        critics.q_value,
        dynamics,
        z0,
        cfg.ope.horizon,
        cfg.ope.seed,
    ).cpu().numpy()  # fmt: skip
    lo, hi = bootstrap_ci(values, cfg.ope.bootstrap, cfg.ope.seed)
    return {"estimate": float(values.mean()), "ci95": [lo, hi], "n": len(values)}


@torch.no_grad()
def chunk_shift(policy: DiffusionPolicy, reference: DiffusionPolicy, z: torch.Tensor, cfg: RL100Config) -> float:
    """RMS distance (normalised action units) between the two policies' deterministic executed chunks from the same
    noise at features z: how far a round moved the policy from the BC init, off the data the critic knows."""
    a, b = (
        flat_executed(p, ddim_chunks(p, z, torch.Generator().manual_seed(cfg.ope.seed), cfg.chain.steps))
        for p in (policy, reference)
    )
    return float(((a - b) ** 2).mean().sqrt())


def start_states(data: dict[str, np.ndarray], cfg: RL100Config, device) -> torch.Tensor:
    """The OPE's start features: a fixed seeded draw of dataset states (the same for every candidate of a round)."""
    rng = np.random.default_rng(cfg.ope.seed)
    idx = rng.choice(len(data["obs"]), size=min(cfg.ope.start_states, len(data["obs"])), replace=False)
    return torch.as_tensor(data["obs"][np.sort(idx)], device=device)


# --------------------------------------------------------------------------------- PPO over the chain


def chain_logp(policy: DiffusionPolicy, lp: torch.Tensor) -> torch.Tensor:
    """Per-element log-probs (..., Ha, A) summed over the executed chunk (the chunk is one MDP action)."""
    return lp[..., policy.executed_rows(), :].sum((-2, -1))


def ppo_over_chain(
    policy: DiffusionPolicy,
    critics: IQL,
    states: torch.Tensor,
    cfg: RL100Config,
    log: Callable[[int, dict], None] | None = None,
    *,
    reference: DiffusionPolicy | None = None,
) -> list[dict]:
    """Train `policy.unet` in place by clipped PPO over the denoising chain at dataset features `states`, with a
    KL penalty to `reference` (the BC init; default: the policy as it enters the round) at every denoising step."""
    c, p = cfg.chain, cfg.ppo
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    reference = copy.deepcopy(policy) if reference is None else reference
    reference.requires_grad_(False)
    policy.requires_grad_(False)
    policy.unet.requires_grad_(True)  # the encoder and the normaliser stay frozen
    params = list(policy.unet.parameters())
    opt = torch.optim.Adam(params, lr=p.lr)
    schedule, rows, m = policy.chain_schedule(c.steps, c.eta), policy.executed_rows(), p.chains_per_state
    history = []
    for it in range(p.iterations):
        for group in opt.param_groups:  # linear decay to zero over the round
            group["lr"] = p.lr * (1.0 - it / p.iterations)
        z = states[torch.as_tensor(rng.integers(0, len(states), max(p.batch_size // m, 1)), device=states.device)]
        z = z.repeat_interleave(m, 0)  # M chains per state
        chain, lp_old = policy.sample_chain(z, c.steps, c.eta, c.std_min, c.std_max, generator=gen)
        old = chain_logp(policy, lp_old)  # (B, K)
        adv = chunk_advantage(critics, z, flat_executed(policy, chain[:, -1]), m)
        stats = {"loss": 0.0, "kl": 0.0, "ratio_dev": 0.0, "clip_frac": 0.0}
        for _ in range(p.epochs):
            for k, step in enumerate(schedule):
                mean, std = policy.chain_step(chain[:, k], z, step, c.std_min, c.std_max)
                new = chain_logp(policy, torch.distributions.Normal(mean, std).log_prob(chain[:, k + 1]))
                ratio = torch.exp(new - old[:, k])
                with torch.no_grad():
                    ref_mean, _ = reference.chain_step(chain[:, k], z, step, c.std_min, c.std_max)
                kl = ((mean - ref_mean)[:, rows] ** 2).sum((-2, -1)).mean() / (2 * std**2)  # same σ̃ for both
                loss = -torch.min(ratio * adv, ratio.clamp(1 - p.clip, 1 + p.clip) * adv).mean() + p.kl_coef * kl
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"PPO loss is {loss.item()} at iteration {it}; lower rl100.algo.ppo.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, p.grad_clip)
                opt.step()
                stats["loss"] += loss.item()
                stats["kl"] += kl.item()
                stats["ratio_dev"] += (ratio - 1).abs().mean().item()
                stats["clip_frac"] += ((ratio - 1).abs() > p.clip).float().mean().item()
        n = p.epochs * len(schedule)
        out = {"iteration": it + 1, "lr": opt.param_groups[0]["lr"], **{k: v / n for k, v in stats.items()}}
        out["q_mean"] = float(critics.q_value(z, flat_executed(policy, chain[:, -1])).mean())
        history.append(out)
        if log is not None:
            log(it + 1, out)
    policy.requires_grad_(False)
    return history


@torch.no_grad()
def chunk_advantage(critics: IQL, z: torch.Tensor, action: torch.Tensor, chains_per_state: int = 1) -> torch.Tensor:
    """The PPO advantage of each chain's chunk, normalised over the batch. One chain per state: min(Q1,Q2) − V
    (RL-100). M > 1 chains per state (consecutive rows): min(Q1,Q2) − the mean over the state's M chunks, so the
    critic's error in the state's value (the same for its M chunks) cancels and only the chunks' ranking remains."""
    q = critics.q_value(z, action)
    if chains_per_state > 1:
        baseline = q.view(-1, chains_per_state).mean(1).repeat_interleave(chains_per_state)
    else:
        baseline = critics.v(z)
    adv = q - baseline
    return (adv - adv.mean()) / (adv.std() + 1e-8)


# ------------------------------------------------------------------------------------------------ gate


def gate(candidate: dict, best: dict, delta: float, enabled: bool = True) -> dict:
    """Accept iff AM-Q(candidate) ≥ AM-Q(best) + δ·|AM-Q(best)| (always, when the gate is off); both estimates and
    the threshold are in the returned decision."""
    threshold = best["estimate"] + delta * abs(best["estimate"])
    passed = candidate["estimate"] >= threshold
    return {
        "accepted": bool(passed or not enabled),
        "passed": bool(passed),
        "gated": bool(enabled),
        "candidate": candidate,
        "best": best,
        "threshold": threshold,
        "delta": delta,
    }


# ---------------------------------------------------------------------------------- acting in the world


class ChunkPolicy(Policy):
    """A diffusion policy acting with another chunk sampler: the stochastic chain (collection: η = 1, σ clipped)
    or best-of-N by Q (IDQL-style extraction, RL-100 §1.1 item 8). Same queues as DiffusionPolicy.select_action:
    a chunk from the last To observations whenever the executed rows run out."""

    def __init__(self, policy: DiffusionPolicy, sample: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]):
        self.policy, self.sample = policy, sample
        self.generator: torch.Generator | None = None
        self.num_predictions = 0
        self._obs: deque = deque(maxlen=policy.cfg.obs_horizon)
        self._actions: deque = deque()

    device = property(lambda self: torch.device("cpu"))  # the generator lives on the CPU (noise drawn there)

    def reset(self) -> None:
        self._obs.clear()
        self._actions.clear()

    def eval(self):
        self.policy.eval()
        return self

    def state_dict(self) -> dict:
        return self.policy.state_dict()

    def load_state_dict(self, state, strict: bool = True):
        return self.policy.load_state_dict(state, strict=strict)

    @torch.no_grad()
    def select_action(self, observation) -> np.ndarray:
        pol = self.policy
        obs = {k: torch.as_tensor(np.array(observation[k])) for k in pol.obs_keys}
        self._obs.extend([obs] * (pol.cfg.obs_horizon if not self._obs else 1))
        if not self._actions:
            window = {k: torch.stack([o[k] for o in self._obs])[None] for k in pol.obs_keys}
            z = pol.encode_obs(window)
            chunk = pol.normalizer.unnormalize("action", self.sample(z, self.generator))[0].cpu().numpy()
            self._actions.extend(chunk[pol.executed_rows()].astype(np.float32))
            self.num_predictions += 1
        return self._actions.popleft()


def stochastic_sampler(policy: DiffusionPolicy, chain: ChainConfig):
    """The collection sampler: the η-chain of PPO (exploration comes from its clipped per-step noise)."""

    def sample(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x, _ = policy.sample_chain(z, chain.steps, chain.eta, chain.std_min, chain.std_max, generator=generator)
        return x[:, -1]

    return sample


def best_of_n_sampler(policy: DiffusionPolicy, critics: IQL, n: int, steps: int):
    """N deterministic DDIM chunks from N noises; the one with the highest min(Q1, Q2) is executed."""

    def sample(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        zs = z.repeat_interleave(n, 0)
        chunks = ddim_chunks(policy, zs, gen, steps)
        q = critics.q_value(zs, flat_executed(policy, chunks)).view(z.shape[0], n)
        return chunks.view(z.shape[0], n, *chunks.shape[1:])[torch.arange(z.shape[0]), q.argmax(1)]

    return sample


def check_teacher(policy) -> None:
    """A policy RL-100 can improve: a multi-step diffusion policy with epsilon or sample prediction."""
    if not isinstance(policy, DiffusionPolicy):
        raise ValueError(f"a {type(policy).__name__} has no denoising chain: RL-100 fine-tunes a diffusion policy")
    if policy.cfg.num_inference_steps == 1 and policy.cfg.prediction_type == "sample":
        raise ValueError("this is a distilled one-step policy: give RL-100 its multi-step diffusion teacher")
