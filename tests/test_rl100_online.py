"""algo=rl100_online: the robot's chain re-scores on the learner, GAE over chunk steps, strictly on-policy batches,
and one short real session over ZMQ on Lift (control process and learner as processes) with a resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from robot_rl.algos import algo_config
from robot_rl.algos.rl100 import chain_logp
from robot_rl.algos.rl100_online import RL100Online, gae
from robot_rl.control.safety import SafetyFilter
from robot_rl.factory import make_robot
from robot_rl.interfaces import OBS_PREFIX
from robot_rl.learner.replay_buffer import ReplayBuffer
from robot_rl.policies.chain_sampler import CHAIN, CHAIN_VERSION, CHUNK_INDEX
from robot_rl.policies.checkpoint import MANIFEST, load_policy, write_policy

from builders import run_cli
from conftest import REPO
from test_session import learner_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def small_cfg(base, **over):
    settings = dict(
        base_checkpoint=str(base / "base"),
        batch_chunks=6,
        minibatch=3,
        epochs=2,
        value_hidden=[32],
        distill_steps=2,
        distill_batch=4,
        critic_warmup_iterations=0,
    )
    return algo_config("rl100_online", **{**settings, **over})


def collect(policy, robot, episodes: int, first_episode: int = 0, horizon: int = 20) -> dict:
    """Sim episodes with the robot-side policy, rows shaped as the control process sends them."""
    safety = SafetyFilter(robot.action_feature.low, robot.action_feature.high)
    rows: dict[str, list] = {}
    for ep in range(first_episode, first_episode + episodes):
        obs = robot.reset(seed=ep)
        policy.seed_episode(ep)
        policy.reset()
        for step in range(horizon):
            sent, _ = safety(policy.select_action(obs))
            robot.send_action(sent)
            row = {OBS_PREFIX + k: np.asarray(v) for k, v in obs.items()}
            obs = robot.get_observation()
            row.update(
                action=sent.astype(np.float32),
                reward=np.float32(step == horizon - 1 and ep % 2 == 0),  # a made-up sparse reward
                success=np.bool_(False),
                done=np.bool_(step == horizon - 1),
                episode=np.int64(ep),
                step=np.int64(step),
            )
            row.update(policy.transition_extras(acted=True))
            for k, v in row.items():
                rows.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in rows.items()}


@pytest.fixture(scope="module")
def lift_robot():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "robot" / "lift.yaml"), resolve=True)
    robot = make_robot(cfg)
    robot.connect()
    yield robot
    robot.disconnect()


def test_gae_matches_a_hand_computed_episode():
    r, v, d, lam = np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.6, 0.7]), np.array([0.9, 0.9, 0.8]), 0.5
    d2 = 1.0 - 0.7  # last chunk: terminal, V after it = 0
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2, a1 = d2, d1 + 0.9 * lam * d2
    expected = [d0 + 0.9 * lam * a1, a1, a2]
    np.testing.assert_allclose(gae(r, v, d, lam), expected, rtol=1e-6)
    # the same episode cut by the time limit (no reward at its end): V(o_last) = 0.4 bootstraps the last chunk
    r = np.array([0.0, 0.0, 0.0])
    d2 = 0.0 + 0.8 * 0.4 - 0.7
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    a2, a1 = d2, d1 + 0.9 * lam * d2
    expected = [d0 + 0.9 * lam * a1, a1, a2]
    np.testing.assert_allclose(gae(r, v, d, lam, bootstrap=0.4), expected, rtol=1e-6)


def test_a_success_end_is_terminal_and_a_time_limit_end_bootstraps(lift_base, lift_robot, tmp_path):
    """Episode 0 ends in its success (terminal: nothing after it), episode 1 at the time limit (truncated: the
    last chunk's target is its reward plus γ^L V(o_last), o_last the window ending at the episode's last row)."""
    cfg = small_cfg(lift_base, batch_chunks=2, gamma=0.9)
    algo = RL100Online(cfg, {}, torch.device("cpu"), None)
    rows = collect(RL100Online.build_robot_policy(cfg, {}, lift_robot, seed=0), lift_robot, episodes=2)
    rows["reward"][:] = 0.0
    end0 = np.flatnonzero(rows["episode"] == 0)[-1]
    rows["reward"][end0], rows["success"][end0] = 1.0, True
    replay = ReplayBuffer(tmp_path / "replay.zarr")
    replay.append("robot0", np.arange(len(rows["step"])), rows)
    b = algo.rollout(replay)
    assert b["stats"]["batch/truncated"] == 1 and b["stats"]["batch/success"] == 0.5
    with torch.no_grad():
        values = algo.value(b["window"]).numpy()
        to = algo.policy.cfg.obs_horizon
        end1 = np.flatnonzero(rows["episode"] == 1)[-1]
        o_last = {k: torch.as_tensor(rows[OBS_PREFIX + k][end1 - to + 1 : end1 + 1])[None] for k in algo.value.keys}
        v_last = algo.value(o_last).item()
    starts = np.flatnonzero(np.isfinite(rows[CHAIN_VERSION]))
    last0, last1 = np.flatnonzero(starts <= end0)[-1], len(starts) - 1  # the last chunk of each episode
    len0, len1 = end0 + 1 - starts[last0], end1 + 1 - starts[last1]
    adv = b["adv"].numpy()
    np.testing.assert_allclose(adv[last0], 0.9 ** (len0 - 1) - values[last0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adv[last1], 0.9**len1 * v_last - values[last1], rtol=1e-5, atol=1e-6)


def test_robot_chain_rescores_on_learner_and_stale_versions_stay_out(lift_base, lift_robot, tmp_path):
    cfg = small_cfg(lift_base)
    algo = RL100Online(cfg, {}, torch.device("cpu"), tmp_path / "learner")
    policy = RL100Online.build_robot_policy(cfg, {}, lift_robot, seed=0)
    n = policy.policy.cfg.n_action_steps
    rows = collect(policy, lift_robot, episodes=3)

    # extras: the chain at every chunk's first step (same keys, NaN between), chunk index 0, 1, ... per episode
    starts = np.isfinite(rows[CHAIN_VERSION])
    assert starts.sum() == 3 * int(np.ceil(20 / n)) and (rows["step"][starts] % n == 0).all()
    assert np.isfinite(rows[CHAIN][starts]).all() and np.isnan(rows[CHAIN][~starts]).all()
    np.testing.assert_array_equal(rows[CHUNK_INDEX][starts][:5], [0, 1, 2, 3, 4])
    replay = ReplayBuffer(tmp_path / "replay.zarr")
    replay.append("robot0", np.arange(len(rows["step"])), rows)
    assert algo.ready(replay)

    # the learner rebuilds each chunk's observation window from the rows and re-scores the stored chain: the
    # robot's per-step log-probs come back (same weights, same features)
    b = algo.rollout(replay)
    pol = algo.policy
    with torch.no_grad():
        cond = pol.encode_obs(b["window"])
        lp = pol.chain_log_prob(cond, b["chain"], algo.steps, cfg.eta, cfg.std_min, cfg.std_max)
        rescored = chain_logp(pol, lp)  # (B, K)
    np.testing.assert_allclose(rescored.numpy(), b["old_logp"].numpy(), rtol=1e-4, atol=1e-2)
    assert len(b["adv"]) == starts.sum()

    # one PPO iteration: telemetry, then the version moves on and the robot tags chunks with it
    m = algo.update(replay, np.random.default_rng(0))
    for key in ("ppo/kl", "ppo/clip_frac", "value/loss", "distill/loss", "ppo/iteration_s"):
        assert np.isfinite(m[key]), key
    assert algo.iteration == 1 and not algo.ready(replay), "the old version's batch is never used again"
    policy.load_state_dict(algo.policy_state())
    policy.apply_meta(algo.publish_meta(replay))

    # stale chunks arrive (an old robot still on version 0) beside fresh ones: only version 1 is trained on
    stale = collect(RL100Online.build_robot_policy(cfg, {}, lift_robot, seed=1), lift_robot, 2, first_episode=3)
    fresh = collect(policy, lift_robot, episodes=2, first_episode=5)
    assert set(fresh[CHAIN_VERSION][np.isfinite(fresh[CHAIN_VERSION])]) == {1.0}
    size = replay.size
    for part in (stale, fresh):
        replay.append("robot0", np.arange(size, size + len(part["step"])), part)
        size += len(part["step"])
    b = algo.rollout(replay)
    assert len(b["adv"]) == np.isfinite(fresh[CHAIN_VERSION]).sum()
    assert b["stats"]["batch/stale_dropped"] == np.isfinite(stale[CHAIN_VERSION]).sum()
    assert b["stats"]["batch/episodes"] == 2

    # resume: a fresh learner loading the state continues at the same version with the same weights
    again = RL100Online(cfg, {}, torch.device("cpu"), None)
    again.load_state_dict(algo.state_dict())
    assert again.iteration == 1 and again.publish_meta(replay) == {"policy_version": 1}
    for k, v in algo.policy.state_dict().items():
        assert torch.equal(v, again.policy.state_dict()[k])


def test_a_checkpoint_carries_its_sampler(lift_base, lift_robot, tmp_path):
    """The published teacher deploys the chain PPO trained: written by write_policy with eta > 0, load_policy's
    predict_chunk samples that chain (seeded-reproducible, the robot's chunk for the same seed), unlike eta 0;
    a manifest from before the sampler fields loads as eta 0."""
    cfg = small_cfg(lift_base)
    algo = RL100Online(cfg, {}, torch.device("cpu"), None)
    write_policy(tmp_path / "chain", algo.robot_policy())
    policy = load_policy(tmp_path / "chain", device="cpu")
    assert (policy.cfg.eta, policy.cfg.std_min, policy.cfg.std_max) == (cfg.eta, cfg.std_min, cfg.std_max)
    obs = lift_robot.reset(seed=0)
    window = {
        k: torch.as_tensor(np.asarray(obs[k]))[None, None].repeat(1, policy.cfg.obs_horizon, 1) for k in policy.obs_keys
    }

    def chunk(pol, seed):
        return pol.predict_chunk(window, generator=torch.Generator().manual_seed(seed))

    first, again, other = chunk(policy, 3), chunk(policy, 3), chunk(policy, 4)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    sampler = RL100Online.build_robot_policy(cfg, {}, lift_robot, seed=0)
    sampler.seed_episode(3)
    with sampler.evaluating("chain"):
        robot_chunk = sampler.policy.normalizer.unnormalize("action", sampler.sample(window)[0][None])
    torch.testing.assert_close(first, robot_chunk)
    ddim = load_policy(tmp_path / "chain", device="cpu")
    ddim.cfg = dataclasses.replace(ddim.cfg, eta=0.0)
    assert torch.equal(chunk(ddim, 3), chunk(ddim, 3)) and not torch.allclose(chunk(ddim, 3), first)

    # deploy_sampling ddim publishes eta 0: the deterministic chunk of the same weights
    ddim_algo = RL100Online(small_cfg(lift_base, deploy_sampling="ddim"), {}, torch.device("cpu"), None)
    assert ddim_algo.robot_policy().cfg.eta == 0.0
    torch.testing.assert_close(chunk(ddim_algo.robot_policy(), 3), chunk(ddim, 3))

    manifest = json.loads((tmp_path / "chain" / MANIFEST).read_text())
    for key in ("eta", "std_min", "std_max"):
        del manifest["config"][key]
    (tmp_path / "chain" / MANIFEST).write_text(json.dumps(manifest))
    old = load_policy(tmp_path / "chain", device="cpu")
    assert old.cfg.eta == 0.0
    torch.testing.assert_close(chunk(old, 3), chunk(ddim, 3))


def test_chain_distillation_and_denoising_discount_run_and_bad_settings_are_refused(lift_base, lift_robot, tmp_path):
    """distill_target chain (the student regresses on the deployed eta chain's x_0 from its own x_T) and DPPO's
    denoising discount train; an unknown target or a discount outside (0, 1] is refused before anything starts."""
    for over, match in (({"distill_target": "mean"}, "distill_target"), ({"denoise_gamma": 0.0}, "denoise_gamma")):
        with pytest.raises(ValueError, match=match):
            RL100Online.check_config(small_cfg(lift_base, **over))
    cfg = small_cfg(lift_base, distill_target="chain", denoise_gamma=0.5)
    RL100Online.check_config(cfg)
    algo = RL100Online(cfg, {}, torch.device("cpu"), tmp_path / "learner")
    rows = collect(RL100Online.build_robot_policy(cfg, {}, lift_robot, seed=0), lift_robot, episodes=2)
    replay = ReplayBuffer(tmp_path / "replay.zarr")
    replay.append("robot0", np.arange(len(rows["step"])), rows)
    before = [p.clone() for p in algo.student.unet.parameters()]
    m = algo.update(replay, np.random.default_rng(0))
    assert np.isfinite(m["distill/loss"]) and np.isfinite(m["ppo/kl"]) and m["ppo/clip_frac"] >= 0
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.student.unet.parameters()))


def test_chunks_of_an_episode_still_running_wait(lift_base, lift_robot, tmp_path):
    algo = RL100Online(small_cfg(lift_base), {}, torch.device("cpu"), None)
    policy = RL100Online.build_robot_policy(algo.cfg, {}, lift_robot, seed=0)
    rows = collect(policy, lift_robot, episodes=2)
    rows["done"][:] = False  # neither episode has ended yet
    replay = ReplayBuffer(tmp_path / "replay.zarr")
    replay.append("robot0", np.arange(len(rows["step"])), rows)
    assert not algo.ready(replay)


def session_args(base, run, ports, *extra):
    return [
        "session",
        "algo=rl100_online",
        f"algo.base_checkpoint={base / 'base'}",
        "algo.batch_chunks=12",
        "algo.minibatch=6",
        "algo.epochs=1",
        "algo.value_hidden=[32]",
        "algo.distill_steps=2",
        "algo.distill_batch=4",
        "algo.critic_warmup_iterations=0",
        "algo.eval_chain=true",
        "session.max_episode_steps=24",
        "session.rate_hz=60",
        "session.eval_every_episodes=3",
        "session.eval_episodes=1",
        "session.watchdog_s=2.0",
        "session.heartbeat_s=0.02",
        "device=cpu",
        "tensorboard=false",
        f"session.transitions_port={ports[0]}",
        f"session.weights_port={ports[1]}",
        f"hydra.run.dir={run}",
        *extra,
    ]


def test_session_over_zmq_trains_on_policy_and_resumes(lift_base, tmp_path, ports):
    run = tmp_path / "run"
    out = run_cli(session_args(lift_base, run, ports, "session.episodes=6"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    episodes = read_jsonl(run / "control" / "episodes.jsonl")
    assert [e["episode"] for e in episodes] == list(range(6))
    # the deployed sampler (algo.deploy_sampling: chain) first, the other one beside it (eval_chain)
    assert [e["mode"] for e in read_jsonl(run / "control" / "evals.jsonl")] == ["chain", "ddim"] * 2
    replay = ReplayBuffer(run / "learner" / "replay.zarr")
    version = replay.column(CHAIN_VERSION)
    assert np.isfinite(replay.column(CHAIN)[np.isfinite(version)]).all()
    metrics = [m for m in read_jsonl(run / "learner" / "metrics.jsonl") if "ppo/kl" in m]
    assert metrics, "no PPO iteration ran"
    for m in metrics:
        assert m["batch/chunks"] >= 12 and np.isfinite(m["value/loss"]) and m["updates_per_s"] >= 0
    iterations = max(m["ppo/iteration"] for m in metrics)
    assert np.nanmax(version) >= 1, "the robot sampled with the learner's new versions"
    ckpt, ckpt_dir = learner_checkpoint(run / "learner")
    assert ckpt["updates"] == iterations and (ckpt_dir / "algo_state.pt").exists()
    deployed = load_policy(ckpt_dir).cfg  # the teacher, as deployed: the eta=1 chain PPO trained
    assert deployed.num_inference_steps > 1 and deployed.eta == 1.0
    student = load_policy(run / "learner" / "student")  # what robot-rl eval / deploy open after the session
    assert student.cfg.num_inference_steps == 1 and student.cfg.prediction_type == "sample"

    out = run_cli(session_args(lift_base, run, ports, "session.episodes=9", "session.resume=true"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    learner = json.loads((run / "learner" / "summary.json").read_text())
    assert learner["restored_rows"] == replay.size and learner["updates"] >= iterations
    later = [m for m in read_jsonl(run / "learner" / "metrics.jsonl") if "ppo/kl" in m][len(metrics) :]
    assert all(m["ppo/iteration"] > iterations for m in later), "iterations continue after the resume"
