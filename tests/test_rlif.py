"""RLIF: the takeover labeller's cases, the RLPD batches it feeds, the simulated interveners (value-based with its
sign pitfall, random), the bad-input check, and one short real `robot-rl session algo=rlif` in MuJoCo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robot_rl.algos import algo_config, check_algorithm
from robot_rl.algos.base import SENDER_KEY
from robot_rl.algos.nstep import EpisodeLinks, Pool
from robot_rl.algos.rlif import InterventionSampler, takeover_problem
from robot_rl.reward.intervention import (
    episode_takeovers,
    intervention_rewards,
    learnable_rows,
    rejected_proposal_rows,
    takeover_starts,
)
from robot_rl.sim.experts import LiftExpert, make_expert
from robot_rl.sim.intervener import SimulatedIntervener, value_says_bad

from builders import record_demos, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


class Replay:
    """A ReplayView over plain columns (what the learner's replay gives an algorithm)."""

    def __init__(self, **cols):
        self.cols = {k: np.asarray(v) for k, v in cols.items()}
        self.size = len(next(iter(self.cols.values())))

    def keys(self):
        return [k for k in self.cols if k != SENDER_KEY]

    def column(self, key):
        return self.cols[key]


def rows(*episodes, sender=0, first_episode=0):
    """Columns for episodes given as strings of P (policy acted) / T (teleop acted)."""
    itv, ep, st = [], [], []
    for i, e in enumerate(episodes):
        itv += [c == "T" for c in e]
        ep += [first_episode + i] * len(e)
        st += list(range(len(e)))
    return {
        "intervention": np.array(itv),
        "episode": np.array(ep),
        "step": np.array(st),
        SENDER_KEY: [sender] * len(st),
    }


def labels(cols):
    links = EpisodeLinks()
    links.extend(np.asarray(cols[SENDER_KEY]), cols["episode"], cols["step"])
    return intervention_rewards(cols["intervention"], links.next_idx[: links.size]), links.next_idx[: links.size]


def minus_ones(cols):
    return np.flatnonzero(labels(cols)[0] == -1).tolist()


# ------------------------------------------------------------------------------------------------- labeller
def test_one_takeover_costs_one_minus_one_on_the_last_policy_step():
    r, _ = labels(rows("PPPTTTPP"))
    assert r.tolist() == [0, 0, -1, 0, 0, 0, 0, 0] and r.dtype == np.float32


def test_takeover_at_step_zero_has_no_policy_step_to_blame():
    assert minus_ones(rows("TTPPP")) == []
    assert minus_ones(rows("PPP", "TTP")) == [], "the previous episode's last step is not linked to this one"


def test_back_to_back_takeovers_each_cost_one():
    assert minus_ones(rows("PTPTTPT")) == [0, 2, 5]
    assert minus_ones(rows("PTTTTTP")) == [0], "one long takeover is one takeover"


def test_takeover_at_the_episode_end():
    assert minus_ones(rows("PPPT")) == [2], "the step before a takeover on the last step"
    assert minus_ones(rows("PPTT", "PPPP")) == [1], "an episode ending under takeover; the next one is clean"


def test_resumed_control_process_restarts_numbering_and_never_links_across():
    # a control process restarted mid-session starts its episode's steps again at 0: the old run's last policy
    # step must not be blamed for the new run's takeover at its step 0 (and vice versa)
    first = rows("PPP", sender=0, first_episode=0)
    second = rows("TTPT", sender=0, first_episode=1)
    cols = {k: np.concatenate([np.asarray(first[k]), np.asarray(second[k])]) for k in first}
    assert minus_ones(cols) == [5]
    # interleaved robots: rows of two senders alternate; each sender's episode links only to itself
    a, b = rows("PPT", sender=0), rows("PTP", sender=1)
    mixed = {k: np.ravel(np.column_stack([np.asarray(a[k]), np.asarray(b[k])])) for k in a}
    assert minus_ones(mixed) == [1, 2], "sender 1's step 0 and sender 0's step 1"


def test_labels_are_the_same_however_the_rows_arrive():
    """A resumed learner relinks its replay from disk in one go; a live one links batch by batch."""
    cols = rows("PPTTPPPT", "TPPT", "PPPPPT")
    whole, _ = labels(cols)
    links = EpisodeLinks()
    for a, b in ((0, 3), (3, 4), (4, 11), (11, 18)):
        links.extend(np.asarray(cols[SENDER_KEY])[a:b], cols["episode"][a:b], cols["step"][a:b])
    assert intervention_rewards(cols["intervention"], links.next_idx[:18]).tolist() == whole.tolist()


def test_intervener_steps_kept_behind_a_flag_and_takeovers_counted_per_episode():
    cols = rows("PPTTP", "TTPPPT", "PPPP")
    r, nxt = labels(cols)
    itv = cols["intervention"]
    assert learnable_rows(itv, True).all()
    assert np.array_equal(learnable_rows(itv, False), ~itv)
    assert takeover_starts(itv, nxt).sum() == 2 == -r.sum()
    keys, counts = episode_takeovers(itv, nxt, cols["episode"])
    assert keys.tolist() == [0, 1, 2] and counts.tolist() == [1, 2, 0], "a takeover at step 0 counts as one"


def test_sampler_batches_carry_takeover_rewards_not_the_task_reward():
    cols = rows("PPPTTPPP", "PPPPPPPP")
    n = len(cols["step"])
    cols["reward"] = np.ones(n, np.float32)  # a task reward on the wire: ignored for learning
    cols["success"] = np.zeros(n, bool)
    cols["success"][15] = True  # a success is not terminal either
    cols["obs.x"] = np.arange(n, dtype=np.float32)[:, None]
    cols["action"] = np.zeros((n, 1), np.float32)
    demo = {"obs.x": np.zeros((4, 1), np.float32), "action": np.zeros((4, 1), np.float32)}
    demo["reward"], demo["success"] = np.zeros(4, np.float32), np.zeros(4, bool)
    for keep, expected_starts in ((True, n - 2), (False, n - 2 - 2)):
        sampler = InterventionSampler(
            Pool.from_arrays(demo, np.array([4])), ["x"], ["action"], 1, 0.9, 512, 0.0, False,
            penalty=-1.0, keep_intervener=keep,
        )  # fmt: skip
        pool = sampler.online_pool(Replay(**cols))
        assert len(pool) == expected_starts, "last rows of each episode have no successor; T rows only if kept"
        batch = sampler.sample(Replay(**cols), np.random.default_rng(0))
        x = batch["obs.x"][:, 0].astype(int)
        assert set(batch["return"][x == 2]) == {-1.0} and (batch["return"][x != 2] == 0).all()
        assert (batch["discount"] == np.float32(0.9)).all(), "nothing is terminal, the -1 included"
        assert keep or not np.isin(x, [3, 4]).any()


@pytest.fixture(scope="module")
def one_demo(tmp_path_factory):
    """One scripted Lift demo in a real episode store (shared by the learner tests)."""
    root = tmp_path_factory.mktemp("rlif_demo")
    record_demos(root / "demos", root / "rec", "robot=lift", "record.episodes=1", "teleop.seed=0", paced=False)
    return root / "demos"


def test_rlif_learner_update_uses_the_labels(tmp_path, caplog, one_demo):
    demos = one_demo
    cfg = algo_config(
        "rlif", demos=str(demos), actor_hidden=[16], critic_hidden=[16], num_critics=3, batch_size=16,
        empty_signal_episodes=2, bc_init_steps=30, critic_warmup=31,
    )  # fmt: skip
    from robot_rl.algos.rlif import RLIF
    from robot_rl.data.episode_store import EpisodeStore

    algo = RLIF(cfg, {}, torch.device("cpu"), tmp_path / "learner")
    before = algo.pretrain_actor(1, np.random.default_rng(1))  # after the 30 steps of bc_init_steps
    assert algo.pretrain_actor(150, np.random.default_rng(2)) < before, "BC pre-training fits the prior actions"
    store = EpisodeStore.open(demos, "r")
    obs = {k: store.array(k)[:30] for k in store.features if k.startswith("obs.")}
    cols = {**obs, **rows("P" * 10, "P" * 10, "P" * 10), "action": store.array("action")[:30]}
    cols["reward"], cols["success"] = np.zeros(30, np.float32), np.zeros(30, bool)
    replay = Replay(**cols)
    with caplog.at_level("WARNING", logger="robot_rl.algos.rlif"):
        algo.publish_meta(replay)
    assert "reward signal is empty" in caplog.text and "teleop connected" in caplog.text
    assert algo.ready(replay)
    scalars = algo.update(replay, np.random.default_rng(0))
    assert np.isfinite(scalars["critic/loss"]) and scalars["rlif/takeovers"] == 0 and scalars["rlif/empty"] == 1.0
    assert "actor/loss" not in scalars, "critic_warmup: the actor waits until the replay has 31 rows"
    algo.cfg.critic_warmup, algo.cfg.bc_weight = 0, 1.0  # the actor moves, held near the prior data's actions
    algo.cfg.clip_target = True  # no TD target above 0 (no positive return exists)
    assert np.isfinite(algo.update(replay, np.random.default_rng(1))["actor/loss"])
    signal = json.loads((tmp_path / "learner" / "reward_signal.json").read_text())
    assert signal["empty"] and signal["episodes"] == 3 and signal["episodes_since_takeover"] == 3
    [warning] = algo.warnings()  # what the learner's summary and the session's final warnings carry
    assert "reward signal is empty" in warning and "last 3 episodes" in warning


def test_refused_proposals_are_the_takeover_starts_that_recorded_one():
    cols = rows("PPTTPTP", "TTP")  # takeovers start at rows 2 and 5, and at row 7 (its episode's first row)
    proposal = np.zeros((10, 2), np.float32)
    proposal[5] = np.nan  # the policy had nothing to propose there (a starved chunk runner)
    _, next_idx = labels(cols)
    assert rejected_proposal_rows(cols["intervention"], next_idx, proposal).tolist() == [2, 7]


def test_rlif_update_drives_q_of_refused_proposals_towards_the_penalty(one_demo):
    """rejected_fraction > 0: Q(s, the proposal the operator refused at a takeover start) is regressed on the penalty,
    so the critic rates the one action it saw refused below what the same update without it learns."""
    from robot_rl.algos.rlif import RLIF
    from robot_rl.data.episode_store import EpisodeStore

    store = EpisodeStore.open(one_demo, "r")
    obs = {k: store.array(k)[:30] for k in store.features if k.startswith("obs.")}
    cols = {**obs, **rows("PPPTTPPPPP", "PPTTPPPPPP", "PPPPPTTPPP"), "action": store.array("action")[:30]}
    cols["reward"], cols["success"] = np.zeros(30, np.float32), np.zeros(30, bool)
    cols["policy_action"] = np.clip(cols["action"] + 0.5, -1, 1).astype(np.float32)  # what the operator refused
    replay = Replay(**cols)

    def q_refused(fraction: float) -> float:
        cfg = algo_config(
            "rlif", demos=str(one_demo), actor_hidden=[16], critic_hidden=[16], num_critics=3, batch_size=16,
            bc_init_steps=0, critic_warmup=10_000, rejected_fraction=fraction,
        )  # fmt: skip
        torch.manual_seed(0)
        algo = RLIF(cfg, {}, torch.device("cpu"), None)
        rng = np.random.default_rng(0)
        for _ in range(60):
            out = algo.update(replay, rng)
        assert out["rlif/rejected_rows"] == (3 if fraction else 0)
        idx = [3, 12, 25]
        with torch.no_grad():
            f = algo.model.featurizer(
                {k[4:]: torch.as_tensor(v[idx]) for k, v in obs.items() if k[4:] in algo.obs_keys}
            )
            a = algo.model.scaler.normalize(torch.as_tensor(cols["policy_action"][idx])).clamp(-1, 1)
            return float(algo.critic(f, a).mean())

    assert q_refused(0.5) < q_refused(0.0) - 0.1  # measured: -0.75 vs -0.35


def test_rlif_actor_starts_from_a_bc_mlp_checkpoint_with_the_same_actions(tmp_path, one_demo):
    """algo.init_policy: the actor's mean action is the BC MLP's action (RLIF and HG-DAgger from one start)."""
    from robot_rl.algos.rlif import RLIF
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.policies.checkpoint import write_policy
    from robot_rl.policies.mlp import MLPPolicy

    store = EpisodeStore.open(one_demo, "r")
    feats = {k[4:]: f for k, f in store.features.items() if k.startswith("obs.")}
    data = {k: store.array(k) for k in store.features if k.startswith("obs.") or k == "action"}
    torch.manual_seed(0)
    mlp = MLPPolicy.from_features(feats, store.features["action"], [16, 16])
    mlp.fit_normalizer(data)
    write_policy(tmp_path / "bc", mlp)
    cfg = algo_config("rlif", demos=str(one_demo), actor_hidden=[16, 16], critic_hidden=[16], num_critics=2)
    cfg.init_policy, cfg.teleop = str(tmp_path / "bc"), {"type": "device", "device": "spacemouse"}
    RLIF.check_config(cfg)
    algo = RLIF(cfg, {}, torch.device("cpu"), None)
    policy = algo.robot_policy()
    for t in (0, 20, 40):
        obs = {k: data["obs." + k][t] for k in feats}
        np.testing.assert_allclose(policy.select_action(obs), mlp.select_action(obs), atol=1e-5)
    log_std = policy.model.actor[-1].bias[7:]
    assert torch.isfinite(log_std).all() and not policy.model.actor[-1].weight[7:].any(), "log-std: the spread"

    cfg.actor_hidden = [32]
    with pytest.raises(ValueError, match="hidden"):
        RLIF(cfg, {}, torch.device("cpu"), None)
    cfg.init_policy = str(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="init_policy"):
        RLIF.check_config(cfg)


def test_hg_dagger_regresses_only_on_takeover_steps():
    from robot_rl.algos.online_bc import OnlineBC, labelled_rows

    cols = rows("PPTTTPPP")
    cols["expert_action"] = np.ones((8, 2), np.float32)  # every step carries the expert's label (DAgger would use all)
    cols["obs.x"] = np.arange(8, dtype=np.float32)[:, None]
    assert labelled_rows(Replay(**cols), "all").all()
    assert labelled_rows(Replay(**cols), "interventions").tolist() == cols["intervention"].tolist()
    with pytest.raises(ValueError, match="HG-DAgger"):
        check_algorithm({"name": "online_bc", "labels": "takeovers"})
    cfg = algo_config("online_bc", labels="interventions", min_transitions=4, batch_size=8)
    replay = Replay(**cols)
    algo = OnlineBC(cfg, {"hidden": [8]}, torch.device("cpu"), None)
    assert not algo.ready(replay), "3 takeover labels < min_transitions 4"
    cfg.min_transitions = 3

    class Sampled(Replay):
        def sample(self, n, rng, keys):
            idx = rng.integers(0, self.size, n)
            return {k: self.cols[k][idx] for k in keys}

    assert algo.ready(Sampled(**cols))
    out = algo.update(Sampled(**cols), np.random.default_rng(0))
    assert 0 < out["bc/labelled_fraction"] < 1 and np.isfinite(out["bc/loss"])


# ------------------------------------------------------------------------------------------ interveners
def test_value_rule_keeps_its_meaning_for_negative_values():
    # positive values: the released rule Q(a_pi) < alpha Q(a_ref)
    assert value_says_bad(0.5, 1.0, alpha=0.97) and not value_says_bad(0.98, 1.0, alpha=0.97)
    # negative values (RLIF's own rewards): alpha * Q_ref = -0.97 > Q_ref; the released rule would call an action
    # *equal* to the reference bad (-1.0 < -0.97) and a better one too; ours does not
    assert not value_says_bad(-1.0, -1.0, alpha=0.97) and not value_says_bad(-0.9, -1.0, alpha=0.97)
    assert value_says_bad(-2.0, -1.0, alpha=0.97) and not value_says_bad(-1.02, -1.0, alpha=0.97)
    assert value_says_bad(-1.02, -1.0, alpha=1.0, delta=0.0) and not value_says_bad(-1.02, -1.0, 1.0, delta=0.05)


def _drive(iv, policy_actions, obs=None):
    obs = obs or {}
    took = []
    for a in policy_actions:
        iv.get_action(obs) if obs else None
        iv.observe_policy_action(a)
        took.append(iv.intervening)
    return took


class FixedExpert(LiftExpert):
    def get_action(self, observation):
        return np.zeros(7, np.float32)


def test_value_intervener_takes_k_step_takeovers_when_the_critic_says_so():
    # a critic that prefers actions near 0: the policy's action 1.0 is bad, 0.0 is as good as the reference
    critic = lambda obs, a, ref: (-float(np.abs(a).sum()), 0.0 if ref is None else -float(np.abs(ref).sum()))  # noqa: E731
    iv = SimulatedIntervener(FixedExpert(), strategy="value", critic=critic, beta=1.0, takeover_steps=4, seed=0)
    bad, good = np.ones(7, np.float32), np.zeros(7, np.float32)
    assert _drive(iv, [good] * 3, obs={"x": 0}) == [False] * 3
    assert _drive(iv, [bad, good, good, good, good, good], obs={"x": 0}) == [True] * 4 + [False, False]
    assert iv.n_interventions == 1 and iv.intervention_steps == 4
    iv = SimulatedIntervener(FixedExpert(), strategy="value", critic=critic, beta=0.95, compare_to="expert", seed=1)
    took = _drive(iv, [good] * 400, obs={"x": 0})
    assert 0 < iv.n_interventions < 40, "false alarms at 1 - beta per policy step"
    assert sum(took) == iv.intervention_steps


def test_distance_intervener_hands_back_after_k_steps_and_a_perfect_judge_decides():
    bad, good = np.ones(7, np.float32), np.zeros(7, np.float32)
    iv = SimulatedIntervener(FixedExpert(), strategy="distance", threshold=0.5, takeover_steps=3, seed=0)
    # an always-wrong policy: 3 steps of takeover, then the policy acts one step (to be blamed), then again
    assert _drive(iv, [bad] * 8, obs={"x": 0}) == [True, True, True, False, True, True, True, False]
    assert iv.n_interventions == 2
    assert _drive(iv, [good] * 3, obs={"x": 0}) == [False] * 3
    poor = make_expert("Lift", quality="poor", seed=0)
    iv = SimulatedIntervener(poor, strategy="distance", judge="perfect", seed=0)
    assert iv.judge is not poor and iv.judge.noise_std == 0.0 and poor.noise_std > 0


def test_random_intervener_is_seeded_and_needs_nothing_but_p():
    runs = []
    for _ in range(2):
        iv = SimulatedIntervener(FixedExpert(), strategy="random", p_start=0.3, takeover_steps=2, seed=7)
        runs.append(_drive(iv, [np.ones(7, np.float32)] * 200, obs={"x": 0}))
    assert runs[0] == runs[1] and 10 < sum(runs[0]) < 190
    with pytest.raises(ValueError, match="reference critic"):
        SimulatedIntervener(FixedExpert(), strategy="value")


# ------------------------------------------------------------------------------------------------ bad input
def test_teleops_that_cannot_take_over_are_refused_naming_those_that_can():
    assert takeover_problem({"type": "none"}) and takeover_problem(None)
    assert takeover_problem({"type": "scripted", "quality": "poor"})
    assert takeover_problem({"type": "lerobot", "lerobot_type": "so101_leader", "intervening": True})
    for ok in (
        {"type": "scripted", "intervener": {"strategy": "random"}},
        {"type": "device", "device": "spacemouse"},
        {"type": "lerobot", "lerobot_type": "gamepad"},
    ):
        assert takeover_problem(ok) is None
    with pytest.raises(ValueError, match="spacemouse") as e:
        check_algorithm({"name": "rlif", "demos": "/nonexistent", "teleop": {"type": "scripted"}})
    assert "never takes over" in str(e.value)


def test_session_with_a_teleop_that_cannot_take_over_stops_before_the_robot_moves(tmp_path, ports):
    out = run_cli(["session", "algo=rlif", "teleop=none", f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "teleop=none" in text and "spacemouse" in text and "sim_intervener" in text
    assert not (tmp_path / "run" / "control").exists(), "no control process was started"


# ---------------------------------------------------------------------------------------------- a session
def test_rlif_session_in_sim_with_a_simulated_intervener(tmp_path, ports):
    demos = tmp_path / "demos"
    record_demos(demos, tmp_path / "rec", "robot=lift", "record.episodes=2", "teleop.seed=0", paced=False)
    run = tmp_path / "run"
    out = run_cli(
        [
            "session",
            "algo=rlif",
            f"algo.demos={demos}",
            "algo.actor_hidden=[32]",
            "algo.critic_hidden=[32,32]",
            "algo.num_critics=4",
            "algo.batch_size=32",
            "algo.publish_every_updates=10",
            "algo.log_every_updates=10",
            "algo.updates_per_transition=1",
            "algo.empty_signal_episodes=2",
            "teleop=random_intervener",  # takeovers for sure, seeded
            "teleop.intervener.p_start=0.05",
            "teleop.intervener.seed=0",
            "teleop.quality=poor",
            "teleop.seed=0",
            "session.episodes=3",
            "session.max_episode_steps=40",
            "session.rate_hz=60",
            "session.eval_every_episodes=3",
            "session.eval_episodes=1",
            "session.watchdog_s=1.0",
            "session.heartbeat_s=0.02",
            "device=cpu",
            "tensorboard=false",
            f"session.transitions_port={ports[0]}",
            f"session.weights_port={ports[1]}",
            f"hydra.run.dir={run}",
        ]
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    episodes = [json.loads(line) for line in (run / "control" / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 and sum(e["teleop_steps"] for e in episodes) > 0
    assert all(e["policy_steps"] > 0 for e in episodes), "the policy acts from the first step (no expert episodes)"
    assert 0 < sum(e["interventions"] for e in episodes) <= sum(e["teleop_steps"] for e in episodes)  # takeovers

    from robot_rl.learner.replay_buffer import ReplayBuffer

    replay = ReplayBuffer(run / "learner" / "replay.zarr")
    itv = replay.column("intervention")
    assert itv.any() and (~itv).any()
    signal = json.loads((run / "learner" / "reward_signal.json").read_text())
    assert signal["takeovers"] > 0 and signal["episodes"] == 3
    metrics = [json.loads(line) for line in (run / "learner" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["critic/loss"]) for m in metrics if "critic/loss" in m)

    # the session's checkpoint is a reference critic for the value-based intervener (actor + critic ensemble)
    from robot_rl.algos.ensemble import EnsembleQ
    from robot_rl.policies.checkpoint import find_policy_dir
    from robot_rl.sim.intervener import load_reference_critic

    ref = load_reference_critic(run)
    state = torch.load(find_policy_dir(run) / "algo_state.pt", weights_only=True)
    q = EnsembleQ(4, ref.model.featurizer.out_dim + 7, [32, 32])
    q.load_state_dict(state["critic"])
    obs = {k[4:]: replay.column(k)[5] for k in replay.keys() if k.startswith("obs.")}
    a = replay.column("action")[5]
    with torch.no_grad():
        batch = {k: torch.as_tensor(np.asarray(obs[k])).unsqueeze(0) for k in ref.model.obs_keys}
        na = ref.model.scaler.normalize(torch.as_tensor(a).unsqueeze(0)).clamp(-1, 1)
        expected = q(ref.model.featurizer(batch), na).mean().item()
    assert ref.q(obs, a) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    q_pi, q_ref = ref(obs, a, None)
    assert np.isfinite(q_pi) and np.isfinite(q_ref)
