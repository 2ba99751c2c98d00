"""RL-100 part 1 (robot_rl/algos/rl100.py, robot_rl/commands/rl100.py) on tiny data: chain log-probs, chunk
transitions, the OPE helpers, the gate rejecting a destructive update, resume after a crash mid-PPO, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import TINY_DIFFUSION, TINY_IMAGE, hydra_overrides, train_policy
from hydra import compose, initialize_config_module

from robot_rl.algos.ope import bootstrap_ci, sharpe_ratio_at_k, spearman
from robot_rl.algos.rl100 import RL100Config, chunk_transitions
from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.interfaces import Feature
from robot_rl.policies.checkpoint import load_policy

pytestmark = pytest.mark.usefixtures("one_thread")

GAIN = np.array([[0.8, -0.5, 0.3, 0.2], [-0.4, 0.6, 0.2, -0.7]], np.float32)
STEPS = 16


def mixed_store(
    path: Path, episodes: int = 12, success: bool = True, success_column: bool = True, image: bool = False
) -> Path:
    """A toy task with mixed-quality episodes: even episodes act by the rule tanh(GAIN s) (+ small noise) and
    succeed at their last step; odd ones act at random and fail. `success=False`: nobody succeeds. `image`: a
    16x16 camera showing a dot where the state points."""
    feats = {"obs.state": Feature((4,)), "action": Feature((2,), low=-np.ones(2), high=np.ones(2))}
    if success_column:
        feats["success"] = Feature((), "bool")
    if image:
        feats["obs.cam_image"] = Feature((16, 16, 3), "uint8")
    store = EpisodeStore.create(path, feats, fps=10)
    w = store.writer()
    rng = np.random.default_rng(0)
    for e in range(episodes):
        good = e % 2 == 0
        w.begin({"seed": e})
        s = rng.normal(size=4).astype(np.float32)
        for t in range(STEPS):
            rule = np.tanh(GAIN @ s)
            a = (rule + 0.05 * rng.normal(size=2) if good else rng.uniform(-1, 1, 2)).astype(np.float32)
            frame = {"obs.state": s, "action": np.clip(a, -1, 1)}
            if success_column:
                frame["success"] = np.bool_(success and good and t == STEPS - 1)
            if image:
                frame["obs.cam_image"] = np.zeros((16, 16, 3), np.uint8)
                frame["obs.cam_image"][int(8 + 6 * np.tanh(s[0])), int(8 + 6 * np.tanh(s[1]))] = 255
            w.add(frame)
            s = (0.9 * s + 0.1 * np.concatenate([a, a])).astype(np.float32)
        w.save({"success": bool(success and good)})
    store.close()
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The mixed toy store and a tiny diffusion policy cloned from it (few steps: room to improve)."""
    root = tmp_path_factory.mktemp("rl100_toy")
    store = mixed_store(root / "data")
    policy = train_policy(store, root / "bc", "train.batch_size=32", "train.steps=150", "train.warmup_steps=10",
                          *hydra_overrides("policy", TINY_DIFFUSION))  # fmt: skip
    return root, store, policy


SMALL = [
    "rl100.rounds=1",
    "rl100.device=cpu",
    "rl100.collect.episodes=0",
    "rl100.report.eval_episodes=0",
    "rl100.distill.enabled=false",
    "rl100.iql.steps=300",
    "rl100.iql.q_hidden=[64,64]",
    "rl100.iql.v_hidden=[64,64]",
    "rl100.iql.batch_size=64",
    "rl100.algo.dynamics.steps=200",
    "rl100.algo.dynamics.hidden=[32,32]",
    "rl100.algo.dynamics.members=3",
    "rl100.algo.dynamics.elites=2",
    "rl100.algo.ppo.iterations=5",
    "rl100.algo.ppo.batch_size=32",
    "rl100.algo.ope.start_states=64",
    "rl100.algo.ope.bootstrap=200",
    "rl100.algo.ope.horizon=3",
]


def rl100_config(policy, data, *overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose("rl100", overrides=[f"rl100.policy={policy}", f"rl100.data={data}", *SMALL, *overrides])


def run(policy, data, run_dir, *overrides) -> dict:
    from robot_rl.commands.rl100 import STATE, main

    assert main(rl100_config(policy, data, *overrides), run_dir) == 0
    return json.loads((Path(run_dir) / STATE).read_text())


# ------------------------------------------------------------------------------------------ the chain


def test_chain_log_prob_computed_twice_matches(toy):
    _, _, bc = toy
    policy = load_policy(bc, "cpu")
    z = policy.encode_obs({"state": torch.randn(5, 2, 4)})
    chain, lp = policy.sample_chain(z, generator=torch.Generator().manual_seed(0))
    assert chain.shape == (5, policy.cfg.num_inference_steps + 1, 8, 2) and lp.shape == (5, 3, 8, 2)
    again = policy.chain_log_prob(z, chain)
    assert torch.equal(again, policy.chain_log_prob(z, chain))  # deterministic re-scoring
    torch.testing.assert_close(again, lp, rtol=0, atol=1e-5)  # and equal to what sampling recorded
    one = policy.chain_log_prob(z, chain, step_index=1)
    torch.testing.assert_close(one, again[:, 1])
    # eta = 0 with a vanishing std is predict_chunk's deterministic DDIM from the same noise
    x, obs = torch.randn(5, 8, 2), {"state": torch.zeros(5, 2, 4)}
    ref = policy.normalizer.normalize("action", policy.predict_chunk(obs, init_noise=x))
    det, _ = policy.sample_chain(policy.encode_obs(obs), eta=0.0, std_min=1e-9, std_max=1e-9, init_noise=x)
    torch.testing.assert_close(det[:, -1], ref, rtol=0, atol=1e-5)


def test_chunk_transitions(toy):
    _, store_path, bc = toy
    policy = load_policy(bc, "cpu")
    algo = rl100_config(bc, store_path).rl100
    cfg = RL100Config.from_dict(dict(algo.algo), dict(algo.iql))
    store = EpisodeStore.open(store_path)
    data = chunk_transitions([store], policy, cfg)
    n, g = policy.cfg.n_action_steps, cfg.gamma
    assert data["obs"].shape == (store.num_steps, policy.encode_obs({"state": torch.zeros(1, 2, 4)}).shape[1])
    assert data["action"].shape == (store.num_steps, n * 2)
    np.testing.assert_allclose(data["discount"], g**n)
    ep = data["reward"][:STEPS]  # a successful episode: reward 1 at its last step, seen by the last n chunks
    np.testing.assert_allclose(ep[-n:], g ** np.arange(n)[::-1], rtol=1e-6)
    assert not ep[:-n].any() and data["done"][:STEPS][-n:].all() and not data["done"][:STEPS][:-n].any()
    assert not data["reward"][STEPS : 2 * STEPS].any()  # a failed one: no reward, its end still terminal
    assert policy.executed_rows() == slice(1, 1 + n)


def test_kl_anchor_keeps_ppo_near_the_bc_policy(toy):
    """A destructive PPO step size: without the KL term the chunks leave the BC policy's; with it they stay near."""
    import dataclasses

    from robot_rl.algos.rl100 import ddim_chunks, fit_critics, ppo_over_chain

    _, store_path, bc = toy
    ref = load_policy(bc, "cpu")
    algo = rl100_config(bc, store_path).rl100
    cfg = RL100Config.from_dict(dict(algo.algo), dict(algo.iql))
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, lr=1e-3, iterations=4, batch_size=32))
    data = chunk_transitions([EpisodeStore.open(store_path)], ref, cfg)
    critics = fit_critics(data, cfg, "cpu")
    z = torch.as_tensor(data["obs"][:64])
    base = ddim_chunks(ref, z, torch.Generator().manual_seed(1), cfg.chain.steps)
    moved = {}
    for kl in (0.0, 10.0):
        policy = load_policy(bc, "cpu")
        c = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_coef=kl))
        history = ppo_over_chain(policy, critics, torch.as_tensor(data["obs"]), c, reference=ref)
        assert all(np.isfinite(h["kl"]) for h in history)
        chunks = ddim_chunks(policy, z, torch.Generator().manual_seed(1), cfg.chain.steps)
        moved[kl] = float(((chunks - base) ** 2).mean().sqrt())
    assert moved[10.0] < 0.5 * moved[0.0], moved


def test_group_advantage_cancels_the_state_value():
    """M chunks per state: a critic error shared by a state's chunks (its value) drops out of the advantage."""
    from robot_rl.algos.rl100 import chunk_advantage

    class Critic:
        def q_value(self, z, a):
            return 100.0 * z[:, 0] + a[:, 0]  # a large state term, a small action term

        def v(self, z):
            return torch.zeros(len(z))

    z = torch.randn(8, 3).repeat_interleave(4, 0)
    a = torch.randn(32, 2)
    adv = chunk_advantage(Critic(), z, a, chains_per_state=4)
    within = a[:, 0] - a[:, 0].view(8, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(adv, (within - within.mean()) / (within.std() + 1e-8))
    one = chunk_advantage(Critic(), z, a, chains_per_state=1)  # Q - V: ranked by the state term
    assert torch.corrcoef(torch.stack([one, z[:, 0]]))[0, 1] > 0.99


def test_ope_helpers():
    v = np.random.default_rng(0).normal(1.0, 0.5, 400)
    lo, hi = bootstrap_ci(v, 500, 0)
    assert lo < v.mean() < hi and hi - lo < 0.2
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # the top-2 by estimate hold values 0.8 and 0.4 (std 0.2); baseline 0.5 -> (0.8 - 0.5) / 0.2
    assert sharpe_ratio_at_k([3.0, 2.0, 1.0], [0.4, 0.8, 0.9], 0.5, 2) == pytest.approx(1.5)
    assert sharpe_ratio_at_k([3.0, 2.0], [0.4, 0.8], 0.5, 1) is None


# ------------------------------------------------------------------------------------------ the gate


def test_gate_rejects_a_destructive_update(toy, tmp_path):
    """PPO learning rate x100 without the KL anchor: the candidate's AM-Q falls below the BC init's and the gate
    keeps the BC init. (With the default anchor this step size no longer damages the toy policy.)"""
    _, store, bc = toy
    state = run(bc, store, tmp_path / "run", "rl100.algo.ppo.lr=1e-3", "rl100.algo.ppo.iterations=10",
                "rl100.algo.ppo.kl_coef=0")  # fmt: skip
    (decision,) = state["decisions"]
    assert not decision["accepted"] and decision["gated"]
    assert decision["candidate"]["estimate"] < decision["best"]["estimate"]
    assert state["accepted"]["version"] == 0
    assert (tmp_path / "run" / "rounds" / "r1" / "candidate" / "manifest.json").exists()
    assert not (tmp_path / "run" / "policies" / "v1").exists()
    # the same setting without the gate deploys the damaged candidate
    ungated = run(bc, store, tmp_path / "ungated", "rl100.algo.ppo.lr=1e-3", "rl100.algo.ppo.iterations=10",
                  "rl100.algo.ppo.kl_coef=0", "rl100.algo.gate=false")  # fmt: skip
    assert ungated["decisions"][0]["accepted"] and not ungated["decisions"][0]["passed"]
    assert ungated["accepted"]["version"] == 1


# ------------------------------------------------------------------------------------- resume, bad input


def test_resume_after_a_crash_mid_ppo(toy, tmp_path, monkeypatch):
    """A crash in round 2's PPO: the rerun keeps every finished stage (round 1, round 2's fit) and redoes only
    round 2's PPO, from the accepted policy."""
    import robot_rl.commands.rl100 as cmd

    _, store, bc = toy
    real = cmd.ppo_over_chain
    calls = {"ppo": 0, "fit": 0}

    def crashing(policy, critics, states, cfg, log=None, **kw):
        calls["ppo"] += 1
        if calls["ppo"] == 2:  # round 2: die after 2 iterations
            real(policy, critics, states, cfg, lambda it, m: (_ for _ in ()).throw(RuntimeError("killed")) if it == 2
                 else log(it, m), **kw)  # fmt: skip
        return real(policy, critics, states, cfg, log, **kw)

    real_fit = cmd.fit_critics

    def counting_fit(*a, **kw):
        calls["fit"] += 1
        return real_fit(*a, **kw)

    monkeypatch.setattr(cmd, "ppo_over_chain", crashing)
    monkeypatch.setattr(cmd, "fit_critics", counting_fit)
    with pytest.raises(RuntimeError, match="killed"):
        run(bc, store, tmp_path / "run", "rl100.rounds=2")
    state = json.loads((tmp_path / "run" / cmd.STATE).read_text())
    assert list(state["finished"]) == ["r1/collect", "r1/fit", "r1/ppo", "r2/collect", "r2/fit"]
    assert calls == {"ppo": 2, "fit": 2}
    before = dict(state["finished"])
    state = run(bc, store, tmp_path / "run", "rl100.rounds=2")  # the same command again
    assert calls == {"ppo": 3, "fit": 2}  # only round 2's PPO ran again
    assert list(state["finished"]) == [*before, "r2/ppo", "report"]
    assert all(state["finished"][k] == v for k, v in before.items())
    assert [d["round"] for d in state["decisions"]] == [1, 2]
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["bc", "round1", "round2"]
    assert all(c["ope"]["ci95"][0] <= c["ope"]["estimate"] <= c["ope"]["ci95"][1] for c in report["candidates"])
    assert (tmp_path / "run" / "report" / "report.png").stat().st_size > 0
    # one stage alone on the finished run: refit round 1's critics
    state = run(bc, store, tmp_path / "run", "rl100.rounds=2", "rl100.stage=fit", "rl100.round=1")
    assert calls["fit"] == 3 and state["finished"]["r1/fit"] != before["r1/fit"]
    with pytest.raises(ConfigError, match="was started with"):  # a different policy for the same run dir
        run(store, store, tmp_path / "run")


def test_bad_input_is_refused_with_a_clear_message(toy, tmp_path):
    root, store, bc = toy
    with pytest.raises(ConfigError, match="no `success` column and rl100.algo.reward_key is not set"):
        run(bc, mixed_store(tmp_path / "no_column", 2, success_column=False), tmp_path / "a")
    with pytest.raises(ConfigError, match="no episode of the data has a success"):
        run(bc, mixed_store(tmp_path / "no_success", 2, success=False), tmp_path / "b")
    mlp = train_policy(store, root / "mlp", "policy=mlp", "train.steps=5", "train.batch_size=8")
    with pytest.raises(ConfigError, match="has no denoising chain: RL-100 fine-tunes a diffusion policy"):
        run(mlp, store, tmp_path / "c")
    with pytest.raises(ConfigError, match="rl100.policy is not set"):
        with initialize_config_module("robot_rl.configs", version_base=None):
            cfg = compose("rl100", overrides=[f"rl100.data={store}"])
        from robot_rl.commands.rl100 import main

        main(cfg, tmp_path / "d")
    with pytest.raises(ConfigError, match="rl100.stage=ppo for round 1: its critics are not fitted"):
        run(bc, store, tmp_path / "e", "rl100.stage=ppo")
    with pytest.raises(ConfigError, match="rl100.algo.ppo.lrr is not a setting"):
        run(bc, store, tmp_path / "f", "+rl100.algo.ppo.lrr=1")


def test_versions_after_a_rejected_round(toy, tmp_path, monkeypatch):
    """Round 1 rejected, round 2 accepted: round 2's candidate becomes v1 and round 3 starts from it."""
    import robot_rl.commands.rl100 as cmd

    real, calls = cmd.gate, []

    def second_only(new, best, delta, enabled):
        calls.append(1)
        return {**real(new, best, delta, enabled), "accepted": len(calls) == 2}

    monkeypatch.setattr(cmd, "gate", second_only)
    state = run(toy[2], toy[1], tmp_path / "run", "rl100.rounds=3", "rl100.algo.ppo.iterations=1", "rl100.iql.steps=50",
                "rl100.algo.dynamics.steps=20")  # fmt: skip
    assert [d["accepted"] for d in state["decisions"]] == [False, True, False]
    assert [d["best_version"] for d in state["decisions"]] == [0, 0, 1]
    assert state["accepted"] == {"version": 1, "path": "policies/v1"}
    assert [c.get("version") for c in state["candidates"]] == [None, None, 1, None]


def test_a_round_on_camera_observations(tmp_path):
    """The image path end to end: a policy with a camera encoder, features from uint8 frames, critics, PPO, gate."""
    store = mixed_store(tmp_path / "data", 6, image=True)
    bc = train_policy(store, tmp_path / "bc", "train.batch_size=16", "train.steps=20", "train.warmup_steps=2",
                      *hydra_overrides("policy", {**TINY_DIFFUSION, "image": TINY_IMAGE}))  # fmt: skip
    assert load_policy(bc, "cpu").image_keys == ["cam_image"]
    state = run(bc, store, tmp_path / "run", "rl100.algo.ppo.iterations=2", "rl100.iql.steps=50",
                "rl100.algo.dynamics.steps=20")  # fmt: skip
    assert list(state["finished"]) == ["r1/collect", "r1/fit", "r1/ppo", "report"]
    assert len(state["decisions"]) == 1


# ------------------------------------------------------------------------------------------------- in sim


@pytest.mark.timeout(900)  # ~75 s with its fixture on a quiet 2-core machine; a loaded shared one is far slower
def test_a_sim_round_end_to_end(lift_base, tmp_path):
    """Lift: collect with provenance, fit, PPO + gate, the report with true success beside the estimates and
    best-of-N by Q, then the one-step student; every output where the docs say."""
    run_dir = tmp_path / "run"
    state = run(lift_base / "base", lift_base / "demos", run_dir, "rl100.collect.episodes=1",
                "rl100.collect.max_steps=30", "rl100.report.eval_episodes=1", "rl100.report.eval_max_steps=30",
                "rl100.report.best_of_n=2", "rl100.distill.enabled=true", "rl100.distill.steps=2",
                "rl100.distill.eval_episodes=1", "rl100.algo.ppo.iterations=2")  # fmt: skip
    assert list(state["finished"]) == ["r1/collect", "r1/fit", "r1/ppo", "report", "distill"]
    rollouts = EpisodeStore.open(run_dir / "rounds" / "r1" / "rollouts")
    assert rollouts.num_episodes == 1
    meta = rollouts.episodes[0]
    assert (meta["round"], meta["policy_version"], meta["policy"], meta["sampler"]) == (1, 0, "policies/v0", "chain")
    assert "initial_sim_state" in meta  # replayable like any recording
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["bc", "round1"]
    assert all(c["sim"]["episodes"] == 1 for c in report["candidates"])
    assert report["best_of_n"]["n"] == 2 and report["best_of_n"]["episodes"] == 1
    assert report["sharpe_from"] == "sim success"
    student = load_policy(run_dir / "distill", "cpu")
    assert student.cfg.num_inference_steps == 1 and student.cfg.prediction_type == "sample"
    assert state["finished"]["distill"]["eval"]["student"]["episodes"] == 1
