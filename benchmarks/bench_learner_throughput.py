"""Learner throughput: critic-ensemble TD updates/s, batched `EnsembleQ` vs a Python loop over per-head MLPs.

    python benchmarks/bench_learner_throughput.py [--device auto] [--threads 1] [--widths 256,256 1024,1024]
                                                  [--full BASE_RUN DEMOS]

Both variants do the same critic update per step, on the same random batch (batch 256, obs dim 40, action dim 7,
10 heads, each [Linear -> LayerNorm -> ReLU] x len(hidden) -> Linear(1)):
  target forward (no grad) -> min over 2 random target heads -> y = R + discount * min;
  current Q of all heads -> MSE over heads (summed) -> backward -> AdamW step -> Polyak update of the target.
(a) batched: `robot_rl.algos.ensemble.EnsembleQ`, exactly as `ResidualTD3.update` uses it (the target forward
    evaluates all 10 heads in one batched call, then picks 2);
(b) looped: 10 `nn.Sequential` heads (`EnsembleQ.head(i)` copies), a Python loop per forward; the target
    forward runs only the 2 picked heads (the loop's natural advantage);
(c) for reference: (a) with the target forward on the 2 picked heads only (stacked weights indexed by head):
    not what ResidualTD3 does, it shows what the 8 discarded target heads cost.
Polyak: the same per-parameter `lerp_` loop as `robot_rl.algos.ensemble.polyak` (10 tensors batched, 100 looped).
Before timing, the script checks that both compute the same Q values (copied weights), and still do after one
identical update.

Timing is interleaved: a block of (a), then a block of (b), repeated; each block's updates/s, medians reported
with the ratio. Batch sampling is not included (fixed pre-made batches on the device).

`--full BASE_RUN DEMOS`: also the full `ResidualTD3.update` rate (sampling from a ReplayBuffer of online rows +
the demo pool, n-step returns, critic and actor updates) with a `robot-rl train` base run and its demo store,
at each width (actor and critic hidden both set to it).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from robot_rl.algos.ensemble import EnsembleLayerNorm, EnsembleLinear, EnsembleQ  # noqa: E402

HEADS, TARGET_HEADS, TAU, LR, GAMMA = 10, 2, 0.005, 3e-4, 0.99
ADAMW: dict = {}  # extra AdamW options (--fused-adamw); default: torch's default implementation, as ResidualTD3


@torch.no_grad()
def polyak(net: nn.Module, target: nn.Module) -> None:  # as robot_rl.algos.ensemble.polyak
    for p, tp in zip(net.parameters(), target.parameters()):
        tp.lerp_(p, TAU)


class Batched:
    name = "batched EnsembleQ"

    def __init__(self, critic: EnsembleQ):
        self.critic = critic
        self.target = copy.deepcopy(critic).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.critic.parameters(), lr=LR, **ADAMW)

    def q(self, obs, act):
        return self.critic(obs, act)

    def target_q(self, b, heads: torch.Tensor) -> torch.Tensor:
        return self.target(b["next_obs"], b["next_act"])[heads]

    def update(self, b, heads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            heads = heads.to(b["obs"].device)  # as ResidualTD3.update
            y = b["ret"] + b["disc"] * self.target_q(b, heads).min(dim=0).values
        q = self.critic(b["obs"], b["act"])  # (heads, batch)
        return td_step(self.opt, q, y, self.critic, self.target)


def td_step(opt, q: torch.Tensor, y: torch.Tensor, net: nn.Module, target: nn.Module) -> torch.Tensor:
    """Every head's MSE to the TD target, one optimiser step, then the Polyak-averaged target (as ResidualTD3)."""
    loss = F.mse_loss(q, y.expand_as(q), reduction="none").mean(dim=1).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    polyak(net, target)
    return loss.detach()


def subset_q(ens: EnsembleQ, obs: torch.Tensor, act: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Q of the selected heads only, from the stacked weights indexed by `heads` (len(heads), B)."""
    x = torch.cat([obs, act], dim=-1).unsqueeze(0).expand(len(heads), -1, -1)
    for layer in ens.net:
        if isinstance(layer, EnsembleLinear):
            x = torch.baddbmm(layer.bias[heads], x, layer.weight[heads])
        elif isinstance(layer, EnsembleLayerNorm):
            x = F.layer_norm(x, x.shape[-1:], eps=layer.eps) * layer.weight[heads] + layer.bias[heads]
        else:
            x = layer(x)
    return x.squeeze(-1)


class BatchedSubsetTarget(Batched):
    """(c) = (a), but the target forward runs only the 2 picked heads (weights indexed): not what ResidualTD3
    does today; shows what evaluating all 10 target heads costs."""

    name = "batched, 2-head target"

    def target_q(self, b, heads: torch.Tensor) -> torch.Tensor:
        return subset_q(self.target, b["next_obs"], b["next_act"], heads)


class Looped:
    name = "looped nn.Sequential x10"

    def __init__(self, critic: EnsembleQ):
        self.heads = nn.ModuleList([critic.head(i) for i in range(critic.num_heads)]).to(
            next(critic.parameters()).device
        )
        self.target = copy.deepcopy(self.heads).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=LR, **ADAMW)

    def q(self, obs, act):
        x = torch.cat([obs, act], dim=-1)
        return torch.stack([h(x).squeeze(-1) for h in self.heads])

    def update(self, b, heads: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            xn = torch.cat([b["next_obs"], b["next_act"]], dim=-1)
            q_next = torch.stack([self.target[i](xn).squeeze(-1) for i in heads.tolist()]).min(dim=0).values
            y = b["ret"] + b["disc"] * q_next
        return td_step(self.opt, self.q(b["obs"], b["act"]), y, self.heads, self.target)


def make_batches(n: int, batch: int, obs_dim: int, act_dim: int, device, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {
            "obs": torch.randn(batch, obs_dim, generator=g),
            "act": torch.rand(batch, act_dim, generator=g) * 2 - 1,
            "next_obs": torch.randn(batch, obs_dim, generator=g),
            "next_act": torch.rand(batch, act_dim, generator=g) * 2 - 1,
            "ret": (torch.rand(batch, generator=g) < 0.1).float(),
            "disc": torch.full((batch,), GAMMA**3),
        }
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def verify(obs_dim: int, act_dim: int, hidden: list[int], device: torch.device) -> tuple[float, float]:
    """Same Q for copied weights, before and after one identical update; returns the max abs differences."""
    torch.manual_seed(0)
    critic = EnsembleQ(HEADS, obs_dim + act_dim, hidden).to(device)
    a, b, c = Batched(critic), Looped(critic), BatchedSubsetTarget(copy.deepcopy(critic))
    batch = make_batches(1, 256, obs_dim, act_dim, device, seed=123)[0]
    scale = 1.0
    with torch.no_grad():
        qa, qb = a.q(batch["obs"], batch["act"]), b.q(batch["obs"], batch["act"])
        scale = max(1.0, qa.abs().max().item())
        before = (qa - qb).abs().max().item()
    tol = 1e-4 * scale if device.type == "cpu" else 1e-2 * scale  # TF32 matmuls on GPU
    if before > tol:
        raise AssertionError(f"batched and looped Q differ by {before:.3g} before any update (hidden {hidden})")
    heads = torch.tensor([3, 7])
    la, lb, lc = a.update(batch, heads), b.update(batch, heads), c.update(batch, heads)
    for other in (lb, lc):
        if abs(la.item() - other.item()) > 1e-4 * max(1.0, abs(la.item())) * (1 if device.type == "cpu" else 100):
            raise AssertionError(f"losses differ: {la.item()} vs {other.item()}")
    with torch.no_grad():
        after = (a.q(batch["obs"], batch["act"]) - b.q(batch["obs"], batch["act"])).abs().max().item()
        # the target networks moved identically too
        ta = a.target(batch["obs"], batch["act"])
        tb = torch.stack([h(torch.cat([batch["obs"], batch["act"]], -1)).squeeze(-1) for h in b.target])
        tdiff = (ta - tb).abs().max().item()
        cdiff = (a.q(batch["obs"], batch["act"]) - c.q(batch["obs"], batch["act"])).abs().max().item()
        after = max(after, cdiff)
    # one AdamW step moves every weight by ~lr: allow a little float noise on top (sign of tiny grads)
    if max(after, tdiff) > max(tol, 1e-3 * scale):
        raise AssertionError(f"after one update Q differs by {after:.3g} (target {tdiff:.3g}), hidden {hidden}")
    return before, max(after, tdiff)


def bench_width(hidden: list[int], args, device: torch.device) -> dict:
    torch.manual_seed(1)
    critic = EnsembleQ(HEADS, args.obs_dim + args.act_dim, hidden).to(device)
    variants = [Batched(critic), Looped(critic), BatchedSubsetTarget(copy.deepcopy(critic))]
    batches = make_batches(8, args.batch, args.obs_dim, args.act_dim, device)
    gen = torch.Generator().manual_seed(0)
    counter = [0]

    def run(v, n):
        for _ in range(n):
            b = batches[counter[0] % len(batches)]
            counter[0] += 1
            heads = torch.randperm(HEADS, generator=gen)[:TARGET_HEADS]  # on the CPU, as in ResidualTD3
            v.update(b, heads)
        sync(device)

    # warm-up, and a block size giving ~block_s seconds per block for the slower variant
    per_update = []
    for v in variants:
        run(v, 2)
        t = time.perf_counter()
        run(v, 3)
        per_update.append((time.perf_counter() - t) / 3)
    block = max(3, int(round(args.block_s / max(per_update))))
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            t = time.perf_counter()
            run(v, block)
            rates[v.name].append(block / (time.perf_counter() - t))
    med = {k: statistics.median(r) for k, r in rates.items()}
    return {
        "hidden": hidden,
        "block": block,
        "rates": rates,
        "median": med,
        "ratio": med[variants[0].name] / med[variants[1].name],
        "ratio_c": med[variants[2].name] / med[variants[1].name],
    }


# ------------------------------------------------------------------------------------------------- full update
def bench_full(base_run: str, demos: str, hidden: list[int], args, device: torch.device) -> dict:
    from robot_rl.algos import algo_config
    from robot_rl.algos.residual import ResidualTD3
    from robot_rl.interfaces import OBS_PREFIX
    from robot_rl.learner.replay_buffer import ReplayBuffer

    with tempfile.TemporaryDirectory(prefix="bench_learner_") as tmp:
        cfg = algo_config(
            "residual",
            base_checkpoint=base_run,
            demos=demos,
            actor_hidden=list(hidden),
            critic_hidden=list(hidden),
            learning_starts=0,
            critic_warmup=0,
        )
        algo = ResidualTD3(cfg, {}, device, Path(tmp) / "learner")
        # online rows: the demo episodes replayed as if a robot had sent them (base actions attached), repeated
        arr = algo.demo_arrays
        ends = np.flatnonzero(algo.demos.next_idx < 0) + 1
        replay = ReplayBuffer(Path(tmp) / "replay.zarr")
        seq, ep = 0, 0
        while replay.size < args.full_rows:
            start = 0
            for end in ends:
                n = int(end - start)
                rows = {OBS_PREFIX + k: arr[OBS_PREFIX + k][start:end] for k in algo.obs_keys}
                rows.update(
                    {
                        "action": arr["action"][start:end],
                        "base_action": arr["base_action"][start:end],
                        "reward": arr["reward"][start:end],
                        "success": arr["success"][start:end],
                        "intervention": np.zeros(n, bool),
                        "episode": np.full(n, ep, np.int64),
                        "step": np.arange(n, dtype=np.int64),
                    }
                )
                replay.extend("robot0", np.arange(seq, seq + n), rows)  # in memory; zarr once, below
                seq, ep, start = seq + n, ep + 1, int(end)
        replay.flush()
        rng = np.random.default_rng(0)
        for _ in range(3):
            algo.update(replay, rng)
        sync(device)
        t = time.perf_counter()
        algo.update(replay, rng)
        sync(device)
        block = max(3, int(round(args.block_s / (time.perf_counter() - t))))
        rates = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for _ in range(block):
                algo.update(replay, rng)
            sync(device)
            rates.append(block / (time.perf_counter() - t))
        return {
            "hidden": hidden,
            "rows": replay.size,
            "obs_keys": algo.obs_keys,
            "feat_dim": algo.model.featurizer.out_dim,
            "block": block,
            "rates": rates,
            "median": statistics.median(rates),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--widths", nargs="+", default=["256,256", "1024,1024"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--obs-dim", type=int, default=40)
    ap.add_argument("--act-dim", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved (a, b) block pairs")
    ap.add_argument("--block-s", type=float, default=1.5, help="target seconds per block")
    ap.add_argument(
        "--fused-adamw",
        action="store_true",
        help="AdamW(fused=True) in the critic-only variants (not what ResidualTD3 uses)",
    )
    ap.add_argument("--full", nargs=2, metavar=("BASE_RUN", "DEMOS"), default=None)
    ap.add_argument("--full-rows", type=int, default=5000, help="online rows in the --full replay")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.fused_adamw:
        ADAMW["fused"] = True
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    load = os.getloadavg()
    print(
        f"device {device} ({dev_name}); torch {torch.__version__}; torch threads {torch.get_num_threads()}; "
        f"cpus {os.cpu_count()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"critic ensemble: {HEADS} heads, batch {args.batch}, obs dim {args.obs_dim}, action dim {args.act_dim}, "
        f"target = min of {TARGET_HEADS} random heads, AdamW lr {LR} {ADAMW or '(torch default impl)'}, "
        f"Polyak tau {TAU}"
    )

    widths = [[int(x) for x in w.split(",")] for w in args.widths]
    for hidden in widths:
        d0, d1 = verify(args.obs_dim, args.act_dim, hidden, device)
        print(
            f"check hidden {hidden}: batched == looped Q for copied weights (max |diff| {d0:.1e}); "
            f"after one identical update still equal (max |diff| {d1:.1e})"
        )

    results = []
    for hidden in widths:
        r = bench_width(hidden, args, device)
        results.append(r)
        print(f"\nhidden {hidden}: {args.repeats} interleaved block pairs of {r['block']} updates")
        for name, rates in r["rates"].items():
            print(
                f"  {name:<26} median {r['median'][name]:9.1f} updates/s   blocks: "
                + " ".join(f"{x:.1f}" for x in rates)
            )
        print(
            f"  ratio (a) batched / (b) looped: {r['ratio']:.2f}x;  (c) 2-head-target batched / looped: "
            f"{r['ratio_c']:.2f}x"
        )

    print(
        f"\nSUMMARY (critic TD updates/s, batch {args.batch}, {HEADS} heads, device {device}, "
        f"torch threads {torch.get_num_threads()}{', fused AdamW' if ADAMW else ''})"
    )
    print(f"  {'hidden':<14}{'(a) batched':>12}{'(b) looped x10':>16}{'a/b':>8}{'(c) 2-head target':>19}{'c/b':>8}")
    for r in results:
        m = list(r["median"].values())
        print(
            f"  {str(r['hidden']):<14}{m[0]:>12.1f}{m[1]:>16.1f}{r['ratio']:>7.2f}x{m[2]:>19.1f}{r['ratio_c']:>7.2f}x"
        )

    if args.full:
        print(
            f"\nFULL ResidualTD3.update (base {args.full[0]}, demos {args.full[1]}; half demos / half online, "
            f"n-step 3, critic every update + actor every 2nd; batch sampling included)"
        )
        for hidden in widths:
            r = bench_full(args.full[0], args.full[1], hidden, args, device)
            print(
                f"  actor+critic hidden {str(hidden):<12} {r['median']:8.1f} updates/s  (features {r['feat_dim']}, "
                f"obs keys {len(r['obs_keys'])}, {r['rows']} online rows; blocks of {r['block']}: "
                + " ".join(f"{x:.1f}" for x in r["rates"])
                + ")"
            )
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (on {os.cpu_count()} cpus)")


if __name__ == "__main__":
    main()
