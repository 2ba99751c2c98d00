"""Residual off-policy RL (ResFiT): ensemble critic, n-step pools, demos relabelling, residual policy, the update."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch

from robot_rl.algos.demos import load_demos, relabel_base_actions
from robot_rl.algos.ensemble import EnsembleQ
from robot_rl.algos.nstep import EpisodeLinks, Pool
from robot_rl.algos import algo_config
from robot_rl.algos.residual import (
    OutcomeGate,
    ResidualTD3,
    advantage_lcb,
    correlation,
    demo_returns,
    next_gate,
    wilson_lower,
    wilson_upper,
)
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import Feature
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.policies.residual import ResidualModel, ResidualPolicy
from robot_rl.policies.checkpoint import load_policy

from builders import TINY_BASE, toy_store, train_policy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny chunked diffusion base trained briefly on the toy store (`success` from step 15 of 20)."""
    tmp = tmp_path_factory.mktemp("base")
    toy_store(tmp / "store", success_at=15)
    train_policy(
        tmp / "store",
        tmp / "run",
        "train.steps=40",
        "train.batch_size=32",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        *TINY_BASE,
    )
    return tmp


# ------------------------------------------------------------------------------------------------- ensemble
def test_batched_ensemble_equals_each_head_run_alone():
    torch.manual_seed(0)
    q = EnsembleQ(10, 7, [32, 32])
    feats, act = torch.randn(64, 5), torch.randn(64, 2)
    out = q(feats, act)
    assert out.shape == (10, 64)
    for i in range(10):
        alone = q.head(i)(torch.cat([feats, act], dim=-1)).squeeze(-1)
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1]), "heads must be initialised independently"


# ------------------------------------------------------------------------------------------------- n-step
def _toy_pool(rewards, success, ends):
    arrays = {
        "reward": np.asarray(rewards, np.float32),
        "success": np.asarray(success, bool),
        "x": np.arange(len(rewards)),
    }
    return Pool.from_arrays(arrays, np.asarray(ends))


def test_nstep_return_bootstrap_and_terminal():
    # episode A: 5 rows, success at row 3 (cut there in practice; row 4 kept to check it stops); B: 4 rows, timeout
    pool = _toy_pool([0, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0, 0], [5, 9])
    g = 0.9
    out = pool.nstep(np.array([0, 1, 3, 5, 6, 7]), n=3, gamma=g)
    # row 0: rewards of rows 0,1,2 (all 0), bootstrap from row 3 with g^3
    assert out["boot"][0] == 3 and out["discount"][0] == pytest.approx(g**3) and out["return"][0] == 0
    # row 1: rows 1,2,3 -> the success at row 3 pays g^2 and ends the return (discount 0)
    assert out["return"][1] == pytest.approx(g**2) and out["discount"][1] == 0
    # row 3 is terminal itself
    assert out["return"][2] == 1 and out["discount"][2] == 0
    # episode B was cut by the time limit: its last row (8) cannot start a transition but is a bootstrap state
    assert 8 not in pool.starts and 7 in pool.starts
    assert out["boot"][3] == 8 and out["discount"][3] == pytest.approx(g**3)
    assert out["boot"][4] == 8 and out["discount"][4] == pytest.approx(g**2)
    assert out["boot"][5] == 8 and out["discount"][5] == pytest.approx(g)


def test_episode_links_interleaved_senders_and_a_restarted_control():
    links = EpisodeLinks()
    # rows: sender 0 ep0 steps 0,1 | sender 1 ep0 step 0 | sender 0 ep0 step 2 | sender 1 ep0 step 1
    links.extend(np.array([0, 0, 1]), np.array([0, 0, 0]), np.array([0, 1, 0]))
    links.extend(np.array([0, 1]), np.array([0, 0]), np.array([2, 1]))
    assert links.next_idx[:5].tolist() == [1, 3, 4, -1, -1]
    # sender 0 restarts (crash + resume from step 0 of episode 0 again): never linked to its old rows
    links.extend(np.array([0, 0]), np.array([0, 0]), np.array([0, 1]))
    assert links.next_idx[3] == -1 and links.next_idx[5] == 6


# ------------------------------------------------------------------------------------------------- demos
class CountingChunkedBase:
    """A chunked stand-in base: returns its call index within the current chunk; counts resets."""

    def __init__(self, chunk=4):
        self.chunk, self.queue, self.resets = chunk, 0, 0

    def reset(self):
        self.queue, self.resets = 0, self.resets + 1

    def steps_left_in_chunk(self):
        return self.queue

    def select_action(self, obs):
        if self.queue == 0:
            self.queue = self.chunk
        self.queue -= 1
        return np.full(2, self.chunk - 1 - self.queue, np.float32)


def test_demos_cut_at_success_and_relabelled_with_a_reset_per_episode(tmp_path):
    toy_store(tmp_path / "s", episodes=3, steps=10, success_at=6)
    arrays, ends = load_demos(tmp_path / "s", ["state"])
    assert ends.tolist() == [7, 14, 21]  # steps 0..6, cut right after the first success
    assert arrays["reward"].sum() == 3 and arrays["success"][[6, 13, 20]].all()
    base = CountingChunkedBase(chunk=4)
    labels = relabel_base_actions(base, arrays, ends, ["state"])
    assert base.resets == 3
    # each episode starts a fresh chunk: 0,1,2,3,0,1,2 — a stale queue would shift the second episode
    assert labels[:7, 0].tolist() == [0, 1, 2, 3, 0, 1, 2] and labels[7:14, 0].tolist() == [0, 1, 2, 3, 0, 1, 2]


def test_no_successful_demos_is_a_clear_error(tmp_path):
    toy_store(tmp_path / "s", episodes=2, steps=5, success_at=None)
    with pytest.raises(ValueError, match="no successful episodes"):
        load_demos(tmp_path / "s", ["state"])


# ------------------------------------------------------------------------------------------- residual policy
def _model(scale=0.2):
    cfg = {"actor_hidden": [16], "scale": scale}
    return ResidualModel({"state": Feature((4,))}, ["state"], 2, cfg)


def test_residual_starts_at_zero_and_is_bounded():
    model = _model(scale=0.1)
    model.scaler.fit(np.array([[-1.0, 0.0], [1.0, 0.5]]), 0.1, 0.1)
    obs = {"state": torch.randn(8, 4)}
    assert torch.equal(model(obs, torch.zeros(8, 2)), torch.zeros(8, 2))
    with torch.no_grad():  # any weights: |residual| <= scale
        for p in model.actor.parameters():
            p.normal_(0, 10)
    assert model(obs, torch.zeros(8, 2)).abs().max() <= 0.1 + 1e-6
    # the base lies within +-1/(1+scale) of the normalised range
    assert model.scaler.normalize(torch.tensor([1.0, 0.5])).tolist() == pytest.approx([1 / 1.1, 1 / 1.1])


def test_residual_policy_is_the_base_before_learning_and_swaps_weights_at_chunk_boundaries():
    base = CountingChunkedBase(chunk=4)
    model = _model()
    policy = ResidualPolicy(base, model, seed=0)
    policy.exploration = "none"
    policy.reset()
    obs = {"state": np.zeros(4, np.float32)}
    assert policy.select_action(obs).tolist() == [0.0, 0.0]  # base's action exactly
    new = {k: v.clone() for k, v in model.state_dict().items()}
    last_bias = [k for k in new if k.startswith("actor.net.") and k.endswith(".bias")][-1]
    new[last_bias] = torch.full((2,), 5.0)  # a residual of +scale after tanh saturation
    policy.load_state_dict(new)  # mid-chunk: staged
    assert policy.select_action(obs)[0] == pytest.approx(1.0)  # still the old (zero) residual
    policy.select_action(obs), policy.select_action(obs)  # chunk ends
    a = policy.select_action(obs)  # new chunk: new weights
    assert a[0] == pytest.approx(0.0 + 0.2 * np.tanh(5.0), abs=1e-5)
    policy.use_residual = False
    base.reset()
    assert policy.select_action(obs).tolist() == [0.0, 0.0]
    # the control process's view: evaluation modes, exploration off inside a block, extras sent per transition
    policy.use_residual, policy.exploration = True, "gaussian"
    assert policy.eval_modes == ("base", "residual") and policy.eval_once == ("base",)
    with policy.evaluating("base"):
        base.reset()
        assert policy.exploration == "none" and policy.select_action(obs).tolist() == [0.0, 0.0]
    assert policy.exploration == "gaussian" and policy.use_residual
    extras = policy.transition_extras(acted=True)
    assert extras["base_action"].tolist() == [0.0, 0.0]
    assert set(extras) == {"base_action", "residual", "gate_epoch", "gate_test"} and not extras["gate_test"]
    assert extras["gate_epoch"] == int(model.actor.epoch), "the gate setting the step ran under"
    assert np.isnan(policy.transition_extras(acted=False)["residual"]).all()
    assert policy.transition_extras(acted=False)["gate_epoch"] == -1
    policy.apply_meta({"exploration": "warmup"})
    assert policy.exploration == "warmup" and policy.acts_without_weights and not policy.probe_after_load


# -------------------------------------------------------------------------------------------------- update
def _online_replay(path, store_path, base, episodes=4, epoch=None, success=True, replay=None):
    """Online rows as the control process sends them (episodes of the toy store, base actions attached); with
    `epoch`: the gate epoch and `done` too, appended to `replay` if given, failed episodes if not `success`."""
    replay = replay if replay is not None else ReplayBuffer(path)
    store = EpisodeStore.open(store_path)
    seq, first = replay.size, int(replay.column("episode")[-1]) + 1 if replay.size else 0
    for e in range(first, first + episodes):
        a, b = store.episode_bounds(e % store.num_episodes)
        base.reset()
        n = b - a
        states = store.array("obs.state")[a:b]
        arrays = {
            "obs.state": states,
            "action": store.array("action")[a:b],
            "base_action": np.stack([base.select_action({"state": s}) for s in states]),
            "reward": store.array("success")[a:b].astype(np.float32) * success,
            "success": store.array("success")[a:b] & success,
            "intervention": np.zeros(n, bool),
            "episode": np.full(n, e, np.int64),
            "step": np.arange(n, dtype=np.int64),
        }
        if epoch is not None:
            arrays |= {"gate_epoch": np.full(n, epoch, np.int64), "done": np.arange(n) == n - 1}
        replay.append("robot0", np.arange(seq, seq + n), arrays)
        seq += n
    return replay


def test_update_learns_and_resumes_exactly(base_run, tmp_path):
    cfg = algo_config(
        "residual",
        base_checkpoint=str(base_run / "run"),
        demos=str(base_run / "store"),
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32, 32],
        num_critics=4,
        learning_starts=40,
        critic_warmup=60,
        actor_every=1,
        actor_lr=1e-3,
    )
    algo = ResidualTD3(cfg, {}, torch.device("cpu"), tmp_path / "learner")
    assert list((tmp_path / "learner").glob("demo_base_actions_*.npy")), "relabelled demos are cached"
    replay = _online_replay(tmp_path / "replay", base_run / "store", load_policy(base_run / "run", "cpu"), 2)
    assert algo.ready(replay) and algo.exploration(replay) == "gaussian"
    rng = np.random.default_rng(0)
    before = {k: v.clone() for k, v in algo.model.actor.state_dict().items()}
    m = algo.update(replay, rng)
    assert m["phase"] == 1.0 and "actor/loss" not in m, "critic-only while replay < learning_starts+critic_warmup"
    assert all(torch.equal(before[k], v) for k, v in algo.model.actor.state_dict().items())
    replay = _online_replay(tmp_path / "replay2", base_run / "store", load_policy(base_run / "run", "cpu"), 6)
    losses = [algo.update(replay, rng) for _ in range(30)]
    assert all(np.isfinite(x["critic/loss"]) for x in losses) and "actor/loss" in losses[-1]
    assert any(not torch.equal(before[k], v) for k, v in algo.model.actor.state_dict().items())

    # resume: a fresh learner loading the state continues with identical updates
    state = copy.deepcopy(algo.state_dict())  # as if read back from disk (no tensors shared)
    twin = ResidualTD3(cfg, {}, torch.device("cpu"), tmp_path / "learner")
    twin.load_state_dict(state)
    twin.torch_rng.set_state(algo.torch_rng.get_state())
    torch.manual_seed(1)
    a = algo.update(replay, np.random.default_rng(5))
    torch.manual_seed(1)
    b = twin.update(replay, np.random.default_rng(5))
    assert a == b

    # the policy as the robot runs it (frozen base + a copy of the current residual), exploration off
    robot_side = algo.robot_policy()
    assert isinstance(robot_side, ResidualPolicy) and robot_side.exploration == "none"
    assert robot_side.base is algo.base and robot_side.model is not algo.model
    assert all(torch.equal(v, algo.policy_state()[k]) for k, v in robot_side.state_dict().items())


def test_the_learner_starts_identically_whether_the_demo_relabelling_is_cached_or_not(base_run, tmp_path):
    """The diffusion base samples while it relabels the demos; that must not consume torch's global RNG, or the
    networks built after it start differently on a run that finds the cache (a benchmark was not reproducible)."""
    cfg = algo_config(
        "residual",
        base_checkpoint=str(base_run / "run"),
        demos=str(base_run / "store"),
        actor_hidden=[32],
        critic_hidden=[32, 32],
        num_critics=2,
    )
    learners = []
    for _ in range(2):  # the first builds the cache in tmp_path, the second reads it
        torch.manual_seed(0)
        learners.append(ResidualTD3(cfg, {}, torch.device("cpu"), tmp_path))
    assert len(list(tmp_path.glob("demo_base_actions_*.npy"))) == 1
    first, second = (learner.critic.state_dict() for learner in learners)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(a, b) for a, b in zip(learners[0].model.parameters(), learners[1].model.parameters()))


# ---------------------------------------------------------------------------------------------------- trust
def test_the_update_opens_the_outcome_gate_and_closing_restores_the_actor_that_passed(base_run, tmp_path):
    cfg = algo_config(
        "residual",
        base_checkpoint=str(base_run / "run"),
        demos=str(base_run / "store"),
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32, 32],
        num_critics=4,
        learning_starts=40,
        critic_warmup=0,
        actor_every=1,
        actor_lr=1e-2,
        outcome_levels=2,
        outcome_episodes=3,
        outcome_test_every=0,  # every episode counts (the rows below carry no `gate_test`)
    )
    algo = ResidualTD3(cfg, {}, torch.device("cpu"), tmp_path / "learner")
    base, rng = load_policy(base_run / "run", "cpu"), np.random.default_rng(0)
    replay = _online_replay(tmp_path / "replay", base_run / "store", base, 3, epoch=0)  # the base: 3 of 3
    m = algo.update(replay, rng)
    assert m["actor/gate"] == 0.5 and algo.outcome.level == 1, "3 base episodes and the actor learns: one step"
    assert int(algo.policy_state()["actor.epoch"]) == 1 and float(algo.policy_state()["actor.gate"]) == 0.5
    passed = algo.outcome.validated[0]
    for _ in range(5):
        algo.update(replay, rng)
    moved = algo.model.actor.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in passed["actor"].items() if k not in ("gate", "epoch"))
    _online_replay(None, base_run / "store", base, 1, epoch=0, success=False, replay=replay)
    assert algo.update(replay, rng)["actor/gate"] == 0.5, "a base episode (epoch 0): the reference, 3 of 4"
    _online_replay(None, base_run / "store", base, 1, epoch=1, success=False, replay=replay)
    m = algo.update(replay, rng)  # 0 of 1: upper bound 0.73 < 0.75: back to the base, the actor that passed it
    assert m["actor/gate"] == 0.0 and m["outcome/closes"] == 1 and int(algo.model.actor.epoch) == 2
    for net, saved in ((algo.model.actor, passed["actor"]), (algo.target_actor, passed["target"])):
        now = net.state_dict()
        assert all(torch.equal(now[k], v) for k, v in saved.items() if k not in ("gate", "epoch"))
    assert algo.robot_policy().model({"state": torch.randn(3, 4)}, torch.zeros(3, 2)).abs().max() == 0.0, (
        "the robot runs the base again"
    )


def test_gate_stays_closed_while_the_critic_says_the_residual_is_worse_or_is_unsure():
    worse = torch.tensor([-0.02, -0.01, -0.03, -0.02])  # every head: the residual loses to the base
    unsure = torch.tensor([0.3, -0.25, 0.2, -0.15])  # positive on average, but the heads disagree
    better = torch.tensor([0.05, 0.06, 0.04, 0.05])  # every head agrees it helps
    gate = 0.0
    for adv in (worse, unsure) * 5:
        gate = next_gate(gate, adv, k=1.0, rate=0.25)
    assert gate == 0.0
    for expected in (0.25, 0.5, 0.75, 1.0, 1.0):  # opens by `rate` per update, never past the full bound
        gate = next_gate(gate, better, k=1.0, rate=0.25)
        assert gate == expected
    assert next_gate(gate, unsure, k=1.0, rate=0.25) == 0.75  # and closes as soon as the heads stop agreeing
    assert next_gate(0.5, unsure, k=0.0, rate=0.25) == 0.75  # k = 0: the heads' mean alone decides
    # the ceiling: how well the critic ranks demo states by their known returns
    assert next_gate(0.3, better, k=1.0, rate=0.25, ceiling=0.4) == pytest.approx(0.4)
    assert next_gate(0.9, better, k=1.0, rate=0.25, ceiling=0.4) == pytest.approx(0.65)
    assert demo_returns(np.array([3, 5]), 0.5).tolist() == [0.25, 0.5, 1.0, 0.5, 1.0]
    g = torch.tensor([0.25, 0.5, 1.0, 0.5, 1.0])
    assert correlation(2 * g + 1, g) == pytest.approx(1.0) and correlation(torch.ones(5), g) == 0.0
    # the bound the actor maximises: mean - k * std over heads, exactly 0 where every head says 0 (no NaN there)
    adv = torch.zeros(4, 3, requires_grad=True)
    advantage_lcb(adv, 1.0).sum().backward()
    assert torch.isfinite(adv.grad).all()
    assert advantage_lcb(unsure[:, None], 1.0).item() == pytest.approx((unsure.mean() - unsure.std()).item(), abs=1e-5)


def _frozen_linear_critic(algo, action_weights: torch.Tensor) -> None:
    """Q_h(s, a) = w_h . a (no hidden layer, critic_lr 0: it never changes): the heads' view is fixed by the test."""
    for net in (algo.critic, algo.target_critic):
        layer = net.net[0]
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
            layer.weight[:, -algo.action_dim :, 0] = action_weights


@pytest.mark.parametrize("heads", ["disagree", "agree"])
def test_the_gate_opens_only_where_the_heads_agree_and_travels_to_the_robot(base_run, tmp_path, heads):
    common = dict(
        base_checkpoint=str(base_run / "run"),
        demos=str(base_run / "store"),
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[],
        critic_lr=0.0,
        num_critics=8,
        learning_starts=10,
        critic_warmup=0,
        actor_every=1,
        actor_lr=1e-2,
        calibration_states=0,  # gate ceiling 1 here: the heads' agreement alone decides
        outcome_levels=0,  # the critic-side gate
    )
    cpu = torch.device("cpu")
    trusted = ResidualTD3(algo_config("residual", **common, trust_k=1.0, gate_init=0.0, gate_rate=0.1), {}, cpu)
    resfit = ResidualTD3(algo_config("residual", **common, trust_k=0.0, gate_init=1.0, gate_rate=0.0), {}, cpu)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 2, generator=g) if heads == "disagree" else torch.ones(8, 2)
    w = w - w.mean(dim=0) + torch.tensor([0.3, 0.0]) if heads == "disagree" else w  # mean small, spread large
    replay = _online_replay(tmp_path / "replay", base_run / "store", load_policy(base_run / "run", "cpu"), 2)
    for algo in (trusted, resfit):
        _frozen_linear_critic(algo, w)
        rng = np.random.default_rng(0)
        for _ in range(30):
            algo.update(replay, rng)
    gate = float(trusted.model.actor.gate)
    robot = trusted.robot_policy()
    obs = {"state": torch.randn(4, 4)}
    if heads == "disagree":
        assert gate == 0.0 and float(resfit.model.actor.gate) == 1.0  # ResFiT's gate: always fully open
        assert float(robot.model.actor.gate) == 0.0 and robot.model(obs, torch.zeros(4, 2)).abs().max() == 0.0
        # ResFiT's objective follows the heads' mean to the bound; the lower bound keeps the residual near zero
        proposed = {a: a.model.actor.propose(a.model.featurizer(obs), torch.zeros(4, 2)) for a in (trusted, resfit)}
        assert proposed[resfit][:, 0].mean() > 0.15 and proposed[trusted].abs().mean() < proposed[resfit].abs().mean()
    else:
        assert gate == 1.0 and float(trusted.target_actor.gate) == 1.0
        assert float(robot.model.actor.gate) == 1.0 and robot.model(obs, torch.zeros(4, 2)).min() > 0.1
        # a critic that does not yet rank the demo states by their returns caps the gate at its calibration
        trusted.critic_calibration = lambda: 0.3
        for _ in range(10):
            m = trusted.update(replay, np.random.default_rng(1))
        assert m["actor/gate"] == pytest.approx(0.3) and m["actor/critic_calibration"] == 0.3
    assert torch.equal(trusted.policy_state()["actor.gate"], trusted.model.actor.gate.cpu())


def _episodes(replay, sender, episodes, length=3):
    """Append whole episodes (episode id, gate epoch, success, takeover) as the robot sends them: `done` on the last
    row; epoch a pair (first row's, the rest's) for an episode whose weights changed midway."""
    for episode, epoch, success, took_over in episodes:
        first, rest = epoch if isinstance(epoch, tuple) else (epoch, epoch)
        last = np.arange(length) == length - 1
        seq = replay.seqs_by_sender().get(sender, np.array([-1]))[-1] + 1
        replay.append(
            sender,
            np.arange(seq, seq + length),
            {
                "episode": np.full(length, episode, np.int64),
                "step": np.arange(length, dtype=np.int64),
                "gate_epoch": np.where(np.arange(length) == 0, first, rest).astype(np.int64),
                "success": last & bool(success),
                "done": last,
                "intervention": np.full(length, bool(took_over)),
            },
        )


def test_outcome_gate_opens_on_base_level_success_closes_on_failures_and_resumes(tmp_path):
    assert wilson_upper(0, 3, 1.645) == pytest.approx(1.645**2 / (3 + 1.645**2)) and wilson_upper(0, 0, 1.0) == 1.0
    replay = ReplayBuffer(tmp_path / "replay")
    g = OutcomeGate(levels=4, episodes=3, z=1.645)
    _episodes(replay, "robot0", [(0, 0, 1, 0), (1, 0, 0, 0), (2, 0, 1, 0), (3, 0, 0, 0)])  # the base: 2 of 4
    g.observe(replay)
    assert g.reference == [2, 4] and g.decide() == "open"
    g.open({"actor": torch.zeros(1)})
    assert (g.level, g.epoch, g.gate) == (1, 1, 0.25)
    # not counted: an episode whose weights changed midway, one with a takeover, one still running; two robots
    _episodes(replay, "robot0", [(4, (0, 1), 0, 0), (5, 1, 0, 1), (6, 1, 1, 0)])
    _episodes(replay, "robot1", [(0, 1, 0, 0)])
    replay.append("robot1", np.arange(3, 5), {**_row(1, 1), "done": np.zeros(2, bool)})
    g.observe(replay)
    assert g.current == [1, 2] and g.decide() is None, "1 of 2: not significantly below 0.5, not enough to open"
    replay.append("robot1", np.arange(5, 6), {**_row(1, 1, n=1, success=True), "done": np.ones(1, bool)})
    g.observe(replay)  # the running episode finished: success, counted
    assert g.current == [2, 3] and g.decide() == "open"
    staying = OutcomeGate(levels=4, episodes=3, z=1.645)
    staying.load_state_dict({**g.state_dict(), "current": [1, 3]})
    assert staying.decide() is None, "1 of 3 < the base's 0.5, but not significantly: stay and keep counting"
    g.open({"actor": torch.ones(1)})
    state = g.state_dict()
    torch.save(state, tmp_path / "state.pt")  # as the learner checkpoints it
    twin = OutcomeGate(levels=4, episodes=3, z=1.645)
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    # a run of failures at level 2 closes it, back to level 1 and the actor that passed level 1
    _episodes(replay, "robot0", [(7, 2, 0, 0), (8, 2, 0, 0)])
    for gate in (g, twin):
        gate.observe(replay)
        assert gate.current == [0, 2] and gate.decide() is None  # 0 of 2: upper bound 0.57 >= 0.5
    _episodes(replay, "robot0", [(9, 2, 0, 0)])
    for gate in (g, twin):
        gate.observe(replay)
        assert gate.decide() == "close"  # 0 of 3: upper bound 0.47 < 0.5
        assert torch.equal(gate.close()["actor"], torch.ones(1))
        assert (gate.level, gate.epoch, gate.closes, gate.current) == (1, 3, 1, [0, 0])
    assert g.state_dict().keys() == twin.state_dict().keys()
    assert all(str(g.state_dict()[k]) == str(twin.state_dict()[k]) for k in g.state_dict())
    # episodes at the gate-0 base join the reference, whatever their epoch; unknown (newer) epochs are ignored
    g.record(0, True), g.record(17, True)
    assert g.reference == [3, 5]


def test_outcome_gate_can_count_only_the_robots_noise_free_test_episodes(tmp_path):
    policy = ResidualPolicy(CountingChunkedBase(chunk=4), _model(), seed=0, explore_std=0.5, test_every=2)
    policy.exploration = "gaussian"
    obs = {"state": np.zeros(4, np.float32)}
    for episode in range(4):
        policy.reset()
        action = policy.select_action(obs)
        assert policy.transition_extras(acted=True)["gate_test"] == (episode % 2 == 1)
        assert (action.tolist() == [0.0, 0.0]) == (episode % 2 == 1), "test episodes: the base exactly, no noise"
    replay = ReplayBuffer(tmp_path / "replay")
    _episodes(replay, "robot0", [(0, 0, 1, 0), (1, 0, 0, 0), (2, 0, 1, 0), (3, 0, 0, 0)])
    n = replay.size
    replay2 = ReplayBuffer(tmp_path / "replay2")
    tested = np.arange(n) // 3 % 2 == 1  # episodes 1 and 3 (3 rows each) were tests: both failed
    replay2.append("robot0", np.arange(n), {**{k: replay.column(k) for k in replay.keys()}, "gate_test": tested})
    g = OutcomeGate(levels=4, episodes=3, z=1.645, tests_only=True)
    g.observe(replay2)
    assert g.reference == [0, 2]


def _one_level(gate: OutcomeGate, p: float, rng: np.random.Generator, cap: int = 40) -> tuple[str | None, int]:
    """Feed a level episodes that succeed with probability p until the gate decides (or `cap` episodes)."""
    gate.epoch_levels, gate.current = [0, 1], [0, 0]
    for n in range(1, cap + 1):
        gate.record(1, bool(rng.random() < p))
        if decision := gate.decide():
            return decision, n
    return None, cap


def test_outcome_gate_opens_good_levels_early_and_bad_ones_no_more_often_than_without_the_early_rule():
    """Simulated Bernoulli levels against a base at 0.45 (9 of 20): how often a level of true success p opens, and
    after how many counted episodes, with the early rule (3 episodes, margin 0.1) and without it."""
    assert wilson_lower(3, 3, 1.645) == pytest.approx(0.526, abs=1e-3) and wilson_lower(0, 0, 1.0) == 0.0
    assert wilson_lower(9, 20, 1.645) < 9 / 20 < wilson_upper(9, 20, 1.645)

    def opens(p, **early):
        gate, rng = OutcomeGate(levels=4, episodes=6, z=1.645, **early), np.random.default_rng(0)
        gate.reference = [9, 20]
        runs = [_one_level(gate, p, rng) for _ in range(600)]
        return np.mean([d == "open" for d, _ in runs]), np.mean([n for d, n in runs if d == "open"] or [np.nan])

    for p, most in ((0.10, 0.05), (0.24, 0.30)):  # clearly worse levels: rarely opened, early rule or not
        assert opens(p, early=3, margin=0.1)[0] <= most and opens(p)[0] <= most
        assert opens(p, early=3, margin=0.1)[0] <= opens(p)[0] + 0.03
    assert opens(0.45, early=3, margin=0.1)[0] >= 0.7, "a level as good as the base opens most of the time"
    good, good_without = opens(0.75, early=3, margin=0.1), opens(0.75)
    assert good[0] >= 0.99 and good_without[0] >= 0.99
    assert good[1] <= 4.5 < 6 <= good_without[1], "a good level opens after ~4 counted episodes instead of 6"
    gate = OutcomeGate(levels=4, episodes=6, z=1.645, early=3, margin=0.1)
    gate.reference, gate.current = [9, 20], [3, 3]
    assert gate.decide() is None, "level 0 (the base) never opens early: it waits for `episodes`"


def _row(episode, epoch, n=2, success=False):
    return {
        "episode": np.full(n, episode, np.int64),
        "step": np.arange(3, 3 + n, dtype=np.int64),
        "gate_epoch": np.full(n, epoch, np.int64),
        "success": np.full(n, success),
        "intervention": np.zeros(n, bool),
    }


def test_weights_without_a_gate_load_fully_open():
    model = _model()
    state = {k: v for k, v in model.state_dict().items() if k != "actor.gate"}
    model.actor.gate.fill_(0.0)
    model.load_state_dict(state)
    assert float(model.actor.gate) == 1.0


def test_check_config_errors(base_run, tmp_path):
    from robot_rl.algos import check_algorithm

    with pytest.raises(ValueError, match="base_checkpoint is required"):
        check_algorithm({"name": "residual"})
    with pytest.raises(ValueError, match="algo.base_checkpoint"):
        check_algorithm({"name": "residual", "base_checkpoint": str(tmp_path / "nope"), "demos": "x"})
    with pytest.raises(ValueError, match="not an episode store"):
        check_algorithm({"name": "residual", "base_checkpoint": str(base_run / "run"), "demos": str(tmp_path)})
    with pytest.raises(ValueError, match="not a setting"):
        check_algorithm({"name": "residual", "critic_heads": 3})


def test_takeover_steps_join_the_demo_half_of_each_batch(tmp_path):
    from robot_rl.algos.nstep import RLPDSampler

    demo = {
        "obs.x": np.zeros((10, 1), np.float32),
        "action": np.zeros((10, 1), np.float32),
        "reward": np.zeros(10, np.float32),
        "success": np.zeros(10, bool),
    }
    demo["success"][9] = demo["reward"][9] = 1
    replay = ReplayBuffer(tmp_path / "r")
    n = 40
    took_over = np.zeros(n, bool)
    took_over[20:30] = True
    replay.append(
        "robot0",
        np.arange(n),
        {
            "obs.x": np.ones((n, 1), np.float32),
            "action": np.ones((n, 1), np.float32),
            "reward": np.zeros(n, np.float32),
            "success": np.zeros(n, bool),
            "intervention": took_over,
            "episode": np.zeros(n, np.int64),
            "step": np.arange(n, dtype=np.int64),
        },
    )
    rng = np.random.default_rng(0)
    for flag, expect_online_in_demo_half in ((True, True), (False, False)):
        sampler = RLPDSampler(Pool.from_arrays(demo, np.array([10])), ["x"], ["action"], 3, 0.99, 200, 0.5, flag)
        batch = sampler.sample(replay, rng)
        demo_half = batch["obs.x"][:100, 0]
        assert (demo_half == 1).any() == expect_online_in_demo_half
        assert (batch["obs.x"][100:, 0] == 1).all(), "the online half comes from online rows only"


def test_sac_baseline_phases_update_and_policy(base_run, tmp_path):
    from robot_rl.algos.sac import SAC
    from robot_rl.policies.sac import SACPolicy

    cfg = algo_config(
        "sac",
        demos=str(base_run / "store"),
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32, 32],
        num_critics=4,
        learning_starts=60,
    )
    algo = SAC(cfg, {}, torch.device("cpu"))
    replay = _online_replay(tmp_path / "replay", base_run / "store", load_policy(base_run / "run", "cpu"), 2)
    assert not algo.ready(replay) and algo.publish_meta(replay) == {"exploration": "warmup"}
    replay = _online_replay(tmp_path / "replay2", base_run / "store", load_policy(base_run / "run", "cpu"), 6)
    assert algo.ready(replay) and algo.exploration(replay) == "sample"
    assert algo.trainable_transitions(replay) == replay.size - 60
    rng = np.random.default_rng(0)
    before = copy.deepcopy(algo.policy_state())
    metrics = [algo.update(replay, rng) for _ in range(10)]
    assert all(np.isfinite(m["critic/loss"]) and m["alpha"] > 0 for m in metrics)
    assert any(not torch.equal(before[k], v) for k, v in algo.policy_state().items())
    # the robot side: actions inside the demonstrated range, deterministic when evaluating
    policy = SACPolicy(algo.model.__class__({"state": Feature((4,))}, ["state"], 2, {"actor_hidden": [32]}), seed=0)
    policy.load_state_dict(algo.policy_state())
    policy.exploration = "none"
    obs = {"state": np.ones(4, np.float32)}
    a = policy.select_action(obs)
    assert np.array_equal(a, policy.select_action(obs)) and np.all(np.abs(a) <= 1.0 + 1e-6)
    # the policy as the robot runs it, for checkpoints: the same actions, a copy the learner keeps training past
    robot_side = algo.robot_policy()
    assert isinstance(robot_side, SACPolicy) and robot_side.exploration == "none"
    assert np.array_equal(robot_side.select_action(obs), a) and robot_side.model is not algo.model
