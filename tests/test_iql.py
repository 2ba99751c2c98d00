"""The shared IQL (robot_rl/algos/iql.py): the expectile loss, values on a chain MDP whose answer is known,
policy extraction, per-sample discounts, bad batches, and a state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_rl.algos.iql import IQL, expectile_loss, iql_config

pytestmark = pytest.mark.usefixtures("one_thread")

N_STATES, GAMMA = 5, 0.9  # chain 0..4; state 4 is the goal (terminal), reached from 3 by moving right


def test_defaults_are_the_reference_values():
    cfg = iql_config()
    assert (cfg.expectile, cfg.beta, cfg.tau, cfg.discount, cfg.exp_adv_max) == (0.7, 3.0, 0.005, 0.99, 100.0)
    assert cfg.actor is None
    with pytest.raises(ValueError, match="iql.expctile is not an IQL setting"):
        iql_config(expctile=0.9)
    with pytest.raises(ValueError, match="expectile must be in"):
        iql_config(expectile=1.0)


def test_expectile_loss():
    u = torch.tensor([-2.0, -1.0, 0.5, 3.0])
    assert expectile_loss(u, 0.5).item() == pytest.approx(0.5 * (u**2).mean().item())
    # positive residuals (Q above V) weigh τ, negative ones 1 − τ
    assert expectile_loss(torch.tensor([1.0]), 0.9).item() == pytest.approx(0.9)
    assert expectile_loss(torch.tensor([-1.0]), 0.9).item() == pytest.approx(0.1)
    # its minimiser over a constant is the τ-expectile: the mean at 0.5, rising towards the max as τ -> 1
    x = torch.tensor([0.0, 1.0, 2.0, 10.0])
    fits = []
    for tau in (0.5, 0.7, 0.9, 0.99):
        c = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([c], max_iter=200, line_search_fn="strong_wolfe")

        def closure(c=c, opt=opt, tau=tau):
            opt.zero_grad()
            loss = expectile_loss(x - c, tau)
            loss.backward()
            return loss

        opt.step(closure)
        u = x - c.detach()
        # first-order condition: τ Σ_{u>0} u = (1 − τ) Σ_{u<0} |u|
        assert tau * u[u > 0].sum().item() == pytest.approx((1 - tau) * -u[u < 0].sum().item(), rel=1e-3)
        fits.append(c.item())
    assert fits[0] == pytest.approx(x.mean().item(), abs=1e-4)
    assert fits == sorted(fits) and fits[-1] > 9.0


def chain_batch() -> dict[str, torch.Tensor]:
    """Every (state, action) of the chain once: action +1 moves right, −1 left (floored at 0); reward 1 and done
    on reaching the goal. Uniform behaviour: both actions equally often in the data."""
    rows = []
    for s in range(N_STATES - 1):
        for a in (-1.0, 1.0):
            s2 = min(s + 1, N_STATES - 1) if a > 0 else max(s - 1, 0)
            rows.append((s, a, float(s2 == N_STATES - 1), s2))
    eye = torch.eye(N_STATES)
    s, a, r, s2 = (torch.tensor(c) for c in zip(*rows))
    return {"obs": eye[s], "action": a[:, None], "reward": r, "next_obs": eye[s2], "done": r.clone()}


def iql_fixed_point(expectile: float, iters: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """IQL's exact fixed point on the chain: V(s) is the expectile of {Q(s,−1), Q(s,+1)} (equal weights), i.e.
    lo + τ (hi − lo); Q(s,a) = r + γ (1 − done) V(s')."""
    v = np.zeros(N_STATES)
    q = np.zeros((N_STATES - 1, 2))
    for _ in range(iters):
        for s in range(N_STATES - 1):
            left, right = max(s - 1, 0), s + 1
            q[s] = [GAMMA * v[left], 1.0 if right == N_STATES - 1 else GAMMA * v[right]]
            lo, hi = q[s].min(), q[s].max()
            v[s] = lo + expectile * (hi - lo)
    return v[: N_STATES - 1], q


def fit_chain(steps: int = 1500, **settings) -> tuple[IQL, dict]:
    torch.manual_seed(0)
    cfg = iql_config(discount=GAMMA, q_hidden=[64, 64], v_hidden=[64, 64], critic_lr=3e-3, actor_lr=3e-3, tau=0.05,
                     **settings)  # fmt: skip
    iql = IQL.build(cfg, N_STATES, 1)
    batch = chain_batch()
    iql.fit(lambda: batch, steps)
    return iql, batch


@pytest.mark.parametrize("expectile", [0.7, 0.9])
def test_chain_values_reach_the_known_fixed_point(expectile):
    iql, _ = fit_chain(expectile=expectile)
    v_star, q_star = iql_fixed_point(expectile)
    obs = torch.eye(N_STATES)[: N_STATES - 1]
    v = iql.v(obs).detach().numpy()
    q = np.stack([iql.q_value(obs, torch.full((N_STATES - 1, 1), a)).numpy() for a in (-1.0, 1.0)], 1)
    np.testing.assert_allclose(v, v_star, atol=0.03)
    np.testing.assert_allclose(q, q_star, atol=0.03)
    if expectile == 0.9:  # a higher expectile approaches the optimal values γ^(3 − s) (0.7 stays 0.2 below)
        np.testing.assert_allclose(v, GAMMA ** (3 - np.arange(N_STATES - 1)), atol=0.06)


@pytest.mark.parametrize("actor", ["gaussian", "deterministic"])
def test_policy_extraction_prefers_the_better_action(actor):
    """The data holds both actions equally often; advantage weighting makes the actor move right everywhere."""
    iql, batch = fit_chain(expectile=0.9, actor=actor, beta=10.0)
    mean = iql.actor(torch.eye(N_STATES)[: N_STATES - 1]).detach().squeeze(-1)
    assert (mean > 0.2).all(), mean


def test_per_sample_discount():
    """Self-loops with reward 1: Q = V = 1 / (1 − discount_i), each row with its own discount (γ^chunk rows)."""
    torch.manual_seed(0)
    cfg = iql_config(q_hidden=[32], v_hidden=[32], critic_lr=1e-2, tau=0.1, layer_norm=False)
    iql = IQL.build(cfg, 2, 1)
    eye = torch.eye(2)
    batch = {"obs": eye, "action": torch.zeros(2, 1), "reward": torch.ones(2), "next_obs": eye,
             "discount": torch.tensor([0.5, 0.75])}  # fmt: skip
    iql.fit(lambda: batch, 2500)
    np.testing.assert_allclose(iql.q_value(eye, torch.zeros(2, 1)).numpy(), [2.0, 4.0], rtol=0.05)


def test_bad_batches_raise_and_leave_weights_alone():
    iql = IQL.build(iql_config(q_hidden=[8], v_hidden=[8]), N_STATES, 1)
    before = {k: v.clone() for k, v in iql.q.state_dict().items()}
    batch = chain_batch()
    batch["reward"] = batch["reward"].clone()
    batch["reward"][3] = float("nan")
    with pytest.raises(ValueError, match="reward has non-finite values"):
        iql.update(batch)
    with pytest.raises(ValueError, match="lacks \\['next_obs'\\]"):
        iql.update({k: v for k, v in chain_batch().items() if k != "next_obs"})
    short = chain_batch()
    short["action"] = short["action"][:3]
    with pytest.raises(ValueError, match="action has 3 rows"):
        iql.update(short)
    assert all(torch.equal(before[k], v) for k, v in iql.q.state_dict().items())
    assert iql.steps == 0


def test_state_round_trip_continues_identically():
    batch = chain_batch()
    a, _ = fit_chain(steps=20, actor="gaussian")
    b = IQL.build(a.cfg, N_STATES, 1)
    b.load_state_dict(a.state_dict())
    assert b.steps == 20
    torch.manual_seed(1)
    out_a = a.update(batch)
    torch.manual_seed(1)
    out_b = b.update(batch)
    assert out_a == out_b
