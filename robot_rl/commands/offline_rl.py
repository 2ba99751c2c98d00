"""`robot-rl offline-rl`: IQL with advantage-weighted policy extraction on a relabelled episode store, from camera
images and proprioception, evaluated in sim against behaviour cloning on the same seeds.

    robot-rl offline-rl offline_rl.data=data/lift offline_rl.reward=reward_vlm
    robot-rl offline-rl offline_rl.data=data/lift offline_rl.reward=success offline_rl.done_key=success

1. BC: a SAC-shaped policy (robot_rl/policies/sac.py: featurizer with a conv encoder per camera + Gaussian actor
   head) maximises log N(a; tanh μ(s), σ(s)) over every recorded step in the offline training loop. It trains the
   image encoder end to end and is the BC baseline (`<run>/bc/policy`).
2. IQL (robot_rl/algos/iql.py) on the frozen encoder's features φ(s): V is the expectile of min(Q1, Q2)_target,
   both Q heads regress on r + γ(1 − done)V(s'), and a fresh actor head is extracted with the clipped weights
   exp(β(Q − V)). Transition t → t+1 within an episode; an episode's last step is kept only when it is terminal.
3. The policy (frozen encoder + the IQL actor head) is written with `write_policy` (kind sac, so eval / deploy /
   export-policy open it) to `<run>/policy`; both policies are rolled out in sim on the same seeds.

Rewards: a derived column written by `robot-rl relabel` (`reward_vlm` picks the newest `reward_vlm_v<n>`) or a
recorded key (e.g. `success` as the ground-truth sparse reward, with `done_key=success`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from robot_rl.config import ConfigError, resolve_device, write_json

log = logging.getLogger("robot_rl.commands.offline_rl")


class FeatureActor(nn.Module):
    """The actor head of a SACModel over precomputed features, as IQL's `actor`: π(a|s) = N(tanh μ, σ)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.model.dist(features)[0])

    def bc_loss(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """−log π(a|s) per sample (B,), actions normalised to [-1, 1]."""
        mean, log_std = self.model.dist(features)
        return -torch.distributions.Normal(torch.tanh(mean), log_std.exp()).log_prob(action).sum(-1)


def resolve_reward(store, name: str) -> tuple[str, np.ndarray]:
    """A recorded key, a derived column, or the newest `<name>_v<n>` derived column."""
    columns = store.derived_columns()
    if name in store.features:
        return name, store.array(name).astype(np.float32).reshape(-1)
    if name in columns:
        return name, store.derived(name).astype(np.float32).reshape(-1)
    versions = sorted((int(m.group(1)), k) for k in columns if (m := re.fullmatch(re.escape(name) + r"_v(\d+)", k)))
    if versions:
        key = versions[-1][1]
        values = store.derived(key).astype(np.float32).reshape(-1)
        if len(values) != store.num_steps:
            raise ConfigError(f"{key} covers {len(values)} of {store.num_steps} steps: relabel the store again")
        return key, values
    raise ConfigError(
        f"offline_rl.reward={name!r} is neither a key of {store.path} nor a derived column; derived columns: "
        f"{list(columns) or 'none (run robot-rl relabel)'}"
    )


def transitions(episode_ends: np.ndarray, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps, next steps): t -> t+1 inside an episode; an episode's last step only if terminal (next = itself)."""
    ends = np.asarray(episode_ends, np.int64)
    n = int(ends[-1]) if len(ends) else 0
    t = np.arange(n)
    nxt = t + 1
    last = np.zeros(n, bool)
    last[ends - 1] = True
    nxt[last] = t[last]
    keep = ~last | done.astype(bool)
    return t[keep], nxt[keep]


def load_arrays(store, image_keys, lowdim_keys) -> dict[str, np.ndarray]:
    from robot_rl.interfaces import OBS_PREFIX

    out = {}
    for k in [*lowdim_keys, *image_keys]:
        if OBS_PREFIX + k not in store.features:
            raise ConfigError(f"{store.path} has no observation {k!r}; it has {sorted(store.features)}")
        out[k] = store.array(OBS_PREFIX + k)
    return out


def obs_batch(arrays: dict, idx: np.ndarray, device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(device) for k, v in arrays.items()}


@torch.no_grad()
def features(model, arrays: dict, batch: int, device) -> torch.Tensor:
    """φ(s) of every step with the featurizer in eval mode (no random shift)."""
    model.eval()
    n = len(next(iter(arrays.values())))
    out = [model.featurizer(obs_batch(arrays, np.arange(a, min(n, a + batch)), device)) for a in range(0, n, batch)]
    return torch.cat(out)


def build_model(store, c, device):
    from robot_rl.interfaces import OBS_PREFIX
    from robot_rl.policies.sac import SACModel

    keys = [*c.lowdim_keys, *c.image_keys]
    obs_features = {k: store.features[OBS_PREFIX + k] for k in keys}
    action = store.features["action"]
    cfg = {"actor_hidden": list(c.actor_hidden), "image_encoder": OmegaConf.to_container(c.image_encoder)}
    return SACModel(obs_features, keys, int(action.shape[0]), cfg).to(device)


def main(cfg: DictConfig, run_dir: str | os.PathLike) -> int:
    from robot_rl.algos.ensemble import EnsembleQ, make_adam
    from robot_rl.algos.iql import IQL, ValueNet, iql_config
    from robot_rl.commands.evaluate import evaluate
    from robot_rl.data.episode_store import EpisodeStore, StoreError
    from robot_rl.policies.checkpoint import CheckpointError, load_policy, read_manifest, write_policy
    from robot_rl.policies.sac import SACPolicy
    from robot_rl.training.loop import LoopConfig, TrainingLoop, seed_everything, store_robot

    c = cfg.get("offline_rl")
    if c is None or not c.get("data"):
        raise ConfigError("offline_rl.data is empty: give the relabelled episode store, e.g. offline_rl.data=data/lift")
    if c.reward_norm not in ("standardize", "none"):
        raise ConfigError(f"offline_rl.reward_norm must be standardize or none, got {c.reward_norm!r}")
    run_dir = Path(run_dir)
    bc_cfg = LoopConfig.from_section(c.bc, "offline_rl.bc")
    try:
        iql_cfg = iql_config(**{**OmegaConf.to_container(c.iql, resolve=True), "actor": None})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        store = EpisodeStore.open(Path(str(c.data)).expanduser())
    except StoreError as e:
        raise ConfigError(f"offline_rl.data: {e}") from None
    device = resolve_device(str(c.get("device", "auto")))
    seed_everything(int(c.seed), c.get("num_threads"))
    reward_key, reward = resolve_reward(store, str(c.reward))
    done = store.array(c.done_key).astype(np.float32).reshape(-1) if c.get("done_key") else np.zeros(store.num_steps)
    arrays = load_arrays(store, list(c.image_keys), list(c.lowdim_keys))
    actions = store.array("action").astype(np.float32)
    model = build_model(store, c, device)
    action_feature = store.features["action"]
    model.scaler.fit(actions, 0.0, 1e-2, action_feature.low, action_feature.high)
    lowdim = np.concatenate([arrays[k].reshape(len(actions), -1) for k in c.lowdim_keys], axis=1)
    model.featurizer.fit(lowdim, float(c.min_std))
    norm_actions = model.scaler.normalize(torch.from_numpy(actions).to(device)).clamp(-1.0, 1.0)
    robot, provenance = store_robot(store), {"data": str(store.path), "reward": reward_key}

    # ---- 1. behaviour cloning: trains the encoder; the BC baseline
    bc_actor = FeatureActor(model)

    def bc_batch(g: np.random.Generator) -> np.ndarray:
        return g.integers(store.num_steps, size=bc_cfg.batch_size)

    def bc_step(idx: np.ndarray):
        model.train()
        loss = bc_actor.bc_loss(model.featurizer(obs_batch(arrays, idx, device)), norm_actions[idx]).mean()
        return loss, {}

    def export(d: Path, module, info: dict) -> None:
        write_policy(
            d,
            SACPolicy(module),
            robot=robot,
            fps=store.fps,
            provenance={"source": "offline-rl/bc", **provenance, **info},
        )

    bc_dir = run_dir / "bc" / "policy"
    if c.get("bc_from"):  # an earlier run's BC stage: same encoder, so rewards are compared on equal features
        bc_dir = Path(str(c.bc_from)).expanduser() / "bc" / "policy"
        try:
            model.load_state_dict(load_policy(bc_dir, device).model.state_dict())
        except (CheckpointError, RuntimeError) as e:
            raise ConfigError(f"offline_rl.bc_from: {bc_dir} is not a BC stage of this data and config: {e}") from None
        bc_summary = {"step": read_manifest(bc_dir)["training"].get("step"), "final_loss": None, "wall_s": 0.0}
    else:
        bc_loop = TrainingLoop(run_dir / "bc", model, bc_step, bc_batch, bc_cfg, name="bc", export=export)
        bc_summary = bc_loop.run()
        export(bc_dir, model, {"step": bc_loop.step})

    # ---- 2. IQL on the frozen encoder's features, a fresh actor head extracted by AWR
    feats = features(model, arrays, int(c.feature_batch), device)
    policy_model = copy.deepcopy(model)
    fresh = build_model(store, c, device)
    policy_model.actor.load_state_dict(fresh.actor.state_dict())
    policy_model.featurizer.requires_grad_(False)
    r = reward.astype(np.float64)
    if c.reward_norm == "standardize":
        r = (r - r.mean()) / max(r.std(), 1e-6)
    t_idx, n_idx = transitions(store.episode_ends, done)
    rew_t = torch.as_tensor(r, dtype=torch.float32, device=device)
    done_t = torch.as_tensor(done, dtype=torch.float32, device=device)
    dim = feats.shape[1]
    q = EnsembleQ(2, dim + norm_actions.shape[1], list(iql_cfg.q_hidden), iql_cfg.layer_norm).to(device)
    v = ValueNet(dim, list(iql_cfg.v_hidden), iql_cfg.layer_norm).to(device)
    actor = FeatureActor(policy_model)
    iql = IQL(
        iql_cfg,
        q,
        v,
        make_adam(q.parameters(), iql_cfg.critic_lr),
        make_adam(v.parameters(), iql_cfg.critic_lr),
        actor,
        make_adam(policy_model.actor.parameters(), iql_cfg.actor_lr),
    )
    g = torch.Generator(device="cpu").manual_seed(int(c.seed))
    t_all = torch.as_tensor(t_idx, device=device)
    n_all = torch.as_tensor(n_idx, device=device)

    def sample() -> dict[str, torch.Tensor]:
        k = torch.randint(len(t_idx), (iql_cfg.batch_size,), generator=g).to(device)
        t, nx = t_all[k], n_all[k]
        return {
            "obs": feats[t],
            "action": norm_actions[t],
            "reward": rew_t[t],
            "next_obs": feats[nx],
            "done": done_t[t],
        }

    def log_iql(step: int, scalars: dict) -> None:
        log.info("iql %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))

    policy_model.train()
    iql_summary = iql.fit(sample, log_every=int(c.iql_log_every), log=log_iql)
    policy_model.eval()
    policy_dir = run_dir / "policy"
    write_policy(
        policy_dir,
        SACPolicy(policy_model),
        robot=robot,
        fps=store.fps,
        provenance={"source": "offline-rl/iql", **provenance, "iql_steps": iql.steps, "bc": str(bc_dir)},
    )
    torch.save(iql.state_dict(), policy_dir / "algo_state.pt")  # critics and optimisers; the loader ignores it
    summary = {
        "store": str(store.path),
        "reward": reward_key,
        "transitions": int(len(t_idx)),
        "bc": {k: bc_summary[k] for k in ("step", "final_loss", "wall_s")},
        "iql": {**iql_summary, "steps": iql.steps},
        "policy": str(policy_dir),
        "bc_policy": str(bc_dir),
    }

    # ---- 3. both policies in sim, same seeds
    robot_cfg = (robot or {}).get("config")
    if int(c.eval_episodes) > 0:
        if not robot_cfg or robot_cfg.get("type") not in ("robosuite",):
            raise ConfigError(
                f"{store.path} was not recorded from a sim robot, so nothing to evaluate in: "
                "set offline_rl.eval_episodes=0"
            )
        todo = {"iql": policy_dir, **({"bc": bc_dir} if c.eval_bc else {})}
        for name, path in todo.items():
            policy = load_policy(path, device)
            result = evaluate(
                policy, robot_cfg, episodes=int(c.eval_episodes), seed=int(c.eval_seed), max_steps=c.eval_max_steps
            )
            summary[f"eval_{name}"] = {
                k: result[k] for k in ("episodes", "seed", "successes", "success_rate", "success_ci95", "mean_length")
            }
    write_json(run_dir / "offline_rl.json", summary)
    line = f"IQL policy ({reward_key}) written to {policy_dir}"
    for name in ("iql", "bc"):
        e = summary.get(f"eval_{name}")
        if e:
            line += f"; {name} success {e['success_rate']:.2f} [{e['success_ci95'][0]:.2f}, {e['success_ci95'][1]:.2f}]"
    print(line, flush=True)
    return 0
