"""Diffusion-policy training throughput on CPU: our DiffusionPolicy vs lerobot's, matched network, one run.

    python benchmarks/bench_train_throughput.py [--quick] [--down-dims 256 512 1024] [--batch 64]

Both: conditional 1-D UNet with the same down_dims / kernel 5 / 8 GroupNorm groups / 128-d step embedding,
obs horizon 2, action horizon 16, 100 DDPM train timesteps, epsilon prediction, AdamW; low-dim observations
(robot state 9-d + object state 10-d, Lift-like), action 7-d; the same random (already normalised) batch every
step, so only the model + optimizer step is timed. Parameter counts are printed to show the match. Steps are
interleaved (ours, lerobot, ours, ...) in blocks; samples/s are medians over blocks. torch threads: as set.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

TO, HA, A, S, E = 2, 16, 7, 9, 10


def ours(down_dims: list[int], batch: int):
    from robot_rl.interfaces import Feature
    from robot_rl.policies.diffusion import DiffusionPolicy

    obs = {"robot_state": Feature((S,)), "object_state": Feature((E,))}
    act = Feature((A,), low=-np.ones(A, np.float32), high=np.ones(A, np.float32))
    policy = DiffusionPolicy.from_features(
        obs,
        act,
        {
            "down_dims": down_dims,
            "kernel_size": 5,
            "n_groups": 8,
            "diffusion_step_embed_dim": 128,
            "obs_horizon": TO,
            "action_horizon": HA,
            "n_action_steps": 8,
        },
    )
    rng = np.random.default_rng(0)
    data = {
        "robot_state": rng.uniform(-1, 1, (1000, S)).astype(np.float32),
        "object_state": rng.uniform(-1, 1, (1000, E)).astype(np.float32),
        "action": rng.uniform(-1, 1, (1000, A)).astype(np.float32),
    }
    policy.fit_normalizer(data)
    b = {
        "obs.robot_state": torch.rand(batch, TO, S) * 2 - 1,
        "obs.object_state": torch.rand(batch, TO, E) * 2 - 1,
        "action": torch.rand(batch, HA, A) * 2 - 1,
        "action_is_pad": torch.zeros(batch, HA, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def step():
        loss = policy.compute_loss(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return policy, step


def lerobot(down_dims: list[int], batch: int):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
    from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy

    cfg = DiffusionConfig(
        n_obs_steps=TO,
        horizon=HA,
        n_action_steps=8,
        down_dims=tuple(down_dims),
        kernel_size=5,
        n_groups=8,
        diffusion_step_embed_dim=128,
        num_train_timesteps=100,
        prediction_type="epsilon",
        device="cpu",
        input_features={
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(S,)),
            "observation.environment_state": PolicyFeature(type=FeatureType.ENV, shape=(E,)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(A,))},
    )
    policy = DiffusionPolicy(cfg)
    policy.train()
    b = {
        "observation.state": torch.rand(batch, TO, S) * 2 - 1,
        "observation.environment_state": torch.rand(batch, TO, E) * 2 - 1,
        "action": torch.rand(batch, HA, A) * 2 - 1,
        "action_is_pad": torch.zeros(batch, HA, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def step():
        loss, _ = policy.forward(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return policy, step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--down-dims", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks, steps = (3, 3) if args.quick else (5, 10)
    runs = {"ours": ours(args.down_dims, args.batch), "lerobot": lerobot(args.down_dims, args.batch)}
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in runs.items()}
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for _, step in runs.values():
        step()  # warm-up
    for _ in range(blocks):
        for name, (_, step) in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            rates[name].append(steps * args.batch / (time.perf_counter() - t))
    o, lr = statistics.median(rates["ours"]), statistics.median(rates["lerobot"])
    print(
        f"diffusion-policy training on CPU ({args.threads} torch threads), batch {args.batch}, down_dims "
        f"{args.down_dims}, obs horizon {TO}, action horizon {HA}"
    )
    print(f"  trainable parameters: ours {params['ours'] / 1e6:.2f} M, lerobot {params['lerobot'] / 1e6:.2f} M")
    print(f"  samples/s (median of {blocks} blocks of {steps} steps): ours {o:.0f} vs lerobot {lr:.0f} ({o / lr:.2f}x)")


if __name__ == "__main__":
    main()
