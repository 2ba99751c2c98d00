"""robot_rl.policies.chunking (AsyncChunkRunner) and robot-rl deploy on the sim Lift robot.

Runner tests use fake policies whose chunk rows hold the tick they are meant for (so a misaligned plan shows up
as a wrong number) and a gate that decides when a chunk "finishes": the delay in ticks is set by the test, not
by the machine's speed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from robot_rl.config import ConfigError
from robot_rl.control.pacing import PacedLoop
from robot_rl.policies.chunking import AsyncChunkRunner, blend_chunk

from builders import robot_store, tiny_diffusion, train_policy

pytestmark = pytest.mark.usefixtures("one_thread")


class TickPolicy:
    """predict_chunk: row i of the chunk is the action for tick (obs tick - (To-1) + i), valued that tick (in
    every dimension, plus `offset`). `gate`: each call waits for one release (the test decides when it ends);
    `sleep_s`: a slow model; `fail_on`: the call number that raises."""

    def __init__(self, to=2, ha=16, n_exec=8, dim=2, sleep_s=0.0, gated=False, fail_on=None, offset=0.0):
        self.cfg = SimpleNamespace(obs_horizon=to, action_horizon=ha, n_action_steps=n_exec)
        self.obs_keys = ["tick"]
        self.dim, self.sleep_s, self.fail_on, self.offset = dim, sleep_s, fail_on, offset
        self.gate = threading.Semaphore(0) if gated else None
        self.started = threading.Semaphore(0)
        self.calls = 0
        self.windows = []

    def predict_chunk(self, batch, generator=None, **kw):
        self.calls += 1
        self.started.release()
        x = batch["tick"]
        self.windows.append(x[0, :, 0].tolist())
        if self.fail_on is not None and self.calls >= self.fail_on:
            raise RuntimeError("boom: model exploded")
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "test never released the gate"
        if self.sleep_s:
            time.sleep(self.sleep_s)
        to, ha = self.cfg.obs_horizon, self.cfg.action_horizon
        rows = float(x[0, -1, 0]) - (to - 1) + np.arange(ha) + self.offset
        return torch.tensor(np.repeat(rows[:, None], self.dim, 1), dtype=torch.float32)[None]


def obs(t):
    return {"tick": np.array([t], np.float32)}


def wait_for(cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.001)


# ------------------------------------------------------------------------------------------------ blending math


def act_reference(chunks, tick, k):
    """ACT's temporal ensembling, written as in its eval loop: every prediction for `tick`, oldest first,
    weighted exp(-k * i) and normalised."""
    preds = [rows[tick - c] for c, rows in chunks if 0 <= tick - c < len(rows)]
    w = np.exp(-k * np.arange(len(preds)))
    return (np.asarray(preds) * (w / w.sum())[:, None]).sum(0)


@pytest.mark.parametrize("k", [0.0, 0.01, 0.5, -0.5])
def test_ensembling_matches_act(k):
    rng = np.random.default_rng(0)
    chunks = [(c, rng.normal(size=(10, 3)).astype(np.float32)) for c in (0, 3, 6, 9)]
    plan = None
    for c, rows in chunks:
        plan = blend_chunk(plan, rows, c, first=c, blend="ensemble", ensemble_k=k, replan_every=3)
    assert plan.start == 9 and plan.end == 19
    for tick in range(9, 19):
        np.testing.assert_allclose(plan.actions[tick - 9], act_reference(chunks, tick, k), rtol=1e-5, atol=1e-6)
    assert plan.count.tolist() == [4, 3, 3, 3, 2, 2, 2, 1, 1, 1]


def test_ensembling_known_numbers_and_skipped_rows():
    a = blend_chunk(None, np.full((8, 1), 1.0), obs_tick=0, first=0, ensemble_k=0.5)
    # chunk B from tick 4 arrives when tick 6 is next: its rows for ticks 4, 5 are in the past
    b = blend_chunk(a, np.full((8, 1), 3.0), obs_tick=4, first=6, ensemble_k=0.5)
    assert (b.start, b.end) == (6, 12)
    w = np.exp(-0.5)
    np.testing.assert_allclose(b.actions[:2, 0], (1 + 3 * w) / (1 + w))  # ticks 6, 7: A and B
    np.testing.assert_allclose(b.actions[2:, 0], 3.0)  # ticks 8..11: B alone
    c = blend_chunk(b, np.full((8, 1), 5.0), obs_tick=7, first=7, ensemble_k=0.5)
    np.testing.assert_allclose(c.actions[0, 0], (1 + 3 * w + 5 * w * w) / (1 + w + w * w))  # tick 7
    np.testing.assert_allclose(c.actions[1, 0], (3 + 5 * w) / (1 + w))  # tick 8
    # max_action_age: rows from age 3 on are not valid
    d = blend_chunk(None, np.arange(8.0)[:, None], obs_tick=10, first=11, max_action_age=3)
    assert (d.start, d.end) == (11, 13) and d.actions[:, 0].tolist() == [1.0, 2.0]
    assert blend_chunk(None, np.zeros((8, 1)), obs_tick=0, first=5, max_action_age=5) is None  # all expired


def test_crossfade_and_switch():
    old = blend_chunk(None, np.zeros((10, 1)), obs_tick=0, first=0)
    x = blend_chunk(old, np.ones((10, 1)), obs_tick=2, first=3, blend="crossfade", crossfade_steps=3)
    np.testing.assert_allclose(x.actions[:5, 0], [0.25, 0.5, 0.75, 1.0, 1.0])
    s = blend_chunk(old, np.ones((10, 1)), obs_tick=2, first=3, blend="switch")
    assert (s.start, s.end) == (3, 12) and np.all(s.actions == 1.0)


# ------------------------------------------------------------------------------------------ runner behaviour


def test_latency_aware_skip_with_a_controlled_delay():
    policy = TickPolicy(n_exec=4, gated=True)
    r = AsyncChunkRunner(policy, 100.0, blend="switch", prefetch_margin=1, warmup=0).start()
    try:
        r.reset()
        policy.gate.release()
        r.prime(obs(0), tick=0)  # chunk from tick 0 covers ticks 0..14; executed part ends at tick 4
        assert policy.started.acquire(timeout=0)  # the prime's call
        got = {}
        for t in range(0, 20):
            r.observe(obs(t), t)
            if t == 2:  # 2 + 1 + margin 1 >= 4: the runner asks for the next chunk from tick 2's window
                assert policy.started.acquire(timeout=5)
            if t == 5:  # ... which "finishes" only now: 3 ticks later (ticks 2, 3, 4 already sent)
                policy.gate.release()
                wait_for(lambda: r.chunks == 2)
            if t in (9, 13):  # later chunks are quicker (requested right after the previous one landed)
                n = r.chunks
                policy.gate.release()
                wait_for(lambda: r.chunks == n + 1)
            got[t] = r.action_for(t)
    finally:
        for _ in range(5):
            policy.gate.release()
        r.stop()
    log = list(r.chunk_log)
    assert log[1]["obs_tick"] == 2 and log[1]["delay_ticks"] == 3 and log[1]["first_tick"] == 5
    assert [(c["obs_tick"], c["delay_ticks"]) for c in log[2:4]] == [(5, 4), (9, 4)]  # landed before tick 9 was pulled
    assert policy.windows[1] == [1.0, 2.0]  # the newest observation window at the request
    # aligned on absolute ticks: the action for tick t is t, whichever chunk served it (a plan that started
    # the late chunk at its first row would send 2 at tick 5)
    for t, a in got.items():
        assert a is not None and a[0] == pytest.approx(t), (t, a)
    assert r.starvations == 0


def test_action_for_never_blocks_on_a_slow_policy():
    policy = TickPolicy(n_exec=4, sleep_s=0.03)  # 30 ms per chunk, 3 ticks at 100 Hz
    r = AsyncChunkRunner(policy, 100.0, warmup=0, prefetch_margin=4).start()
    loop = PacedLoop(100.0)
    times = []
    try:
        r.reset()
        r.prime(obs(0))
        loop.start()
        for _ in range(60):
            t = loop.k
            t0 = time.perf_counter()
            r.observe(obs(t), t)
            a = r.action_for(t)
            times.append(time.perf_counter() - t0)
            if a is not None:
                assert a[0] == pytest.approx(t)
            loop.wait()
    finally:
        r.stop()
    times = np.asarray(times) * 1e6
    assert r.chunks >= 8  # inference kept running beside the loop
    assert np.median(times) < 300, times  # microseconds, while each chunk takes 30 ms
    assert times.max() < 10_000, times.max()
    st = r.stats()
    assert st["inference_p50_ms"] >= 29 and st["delay_ticks_max"] >= 1


def test_starvation_and_max_action_age():
    policy = TickPolicy(n_exec=2, gated=True)
    r = AsyncChunkRunner(policy, 50.0, max_action_age=5, prefetch_margin=0, warmup=0).start()
    try:
        r.reset()
        policy.gate.release()
        r.prime(obs(0))
        out = []
        for t in range(8):
            r.observe(obs(t), t)
            out.append(r.action_for(t))
    finally:
        policy.gate.release()
        r.stop()
    # ticks 0..4 from the chunk (2..4 beyond the executed part: reserve); never an action 5+ ticks old
    assert [a is None for a in out] == [False] * 5 + [True] * 3
    assert r.starvations == 3 and r.reserve_ticks == 3 and r.ticks_served == 5


def test_exception_in_thread_is_reported_and_gives_safe_actions(caplog):
    policy = TickPolicy(n_exec=2, fail_on=2)
    r = AsyncChunkRunner(policy, 100.0, warmup=0, prefetch_margin=0).start()
    try:
        r.reset()
        r.prime(obs(0))
        with caplog.at_level(logging.ERROR, logger="robot_rl.policies.chunking"):
            for t in range(2):
                r.observe(obs(t), t)
                r.action_for(t)
            wait_for(lambda: r.failed)  # the chunk requested at tick 1 raised
            e0 = r.error_ticks
            assert r.action_for(2) is None and r.action_for(3) is None
    finally:
        r.stop()
    assert isinstance(r.error, RuntimeError) and "boom" in r.error_traceback
    assert any("policy inference failed" in m and "boom" in m for m in caplog.messages)
    assert r.stats()["error"] and r.error_ticks - e0 == 2
    with pytest.raises(RuntimeError, match="policy inference failed"):
        r.raise_if_failed()


def test_reset_discards_a_chunk_in_flight():
    policy = TickPolicy(n_exec=2, gated=True)
    r = AsyncChunkRunner(policy, 100.0, warmup=0, prefetch_margin=1).start()
    try:
        r.reset()
        policy.gate.release()
        r.prime(obs(0))
        r.observe(obs(1), 1)  # due: 1 + 1 + 1 >= 2
        assert policy.started.acquire(timeout=5) and policy.started.acquire(timeout=5)
        r.reset()  # new episode while the chunk is computed
        policy.gate.release()
        wait_for(lambda: r.discarded_chunks == 1)
        assert r.action_for(0) is None
    finally:
        policy.gate.release()
        r.stop()


class SingleActionPolicy:
    obs_keys = ["tick"]

    def __init__(self, fail=False):
        self.fail, self.n = fail, 0

    def reset(self):
        self.n = 0

    def select_action(self, o):
        self.n += 1
        if self.fail:
            raise ValueError("bad obs")
        return np.array([o["tick"][0], 0.0], np.float32)


def test_synchronous_fallback_for_single_action_policies():
    r = AsyncChunkRunner(SingleActionPolicy(), 20.0).start()
    assert not r.chunked
    r.reset()
    for t in range(5):
        r.observe(obs(t), t)
        assert r.action_for(t)[0] == t
    assert r.action_for(7) is None and r.starvations == 1  # no observation for tick 7
    st = r.stats()
    assert st["mode"] == "sync" and st["chunks"] == 5 and st["inference_p50_ms"] is not None
    bad = AsyncChunkRunner(SingleActionPolicy(fail=True), 20.0)
    bad.reset()
    bad.observe(obs(0), 0)
    assert bad.action_for(0) is None and isinstance(bad.error, ValueError)


# ---------------------------------------------------------------------------------------- deploy on sim Lift


@pytest.fixture(scope="module")
def lift_run(tmp_path_factory):
    """A tiny diffusion policy trained a few steps on random Lift-shaped data (through the real trainer, so
    the checkpoint, its config and the store's robot config are the real thing)."""
    from omegaconf import OmegaConf

    tmp = tmp_path_factory.mktemp("deploy")
    with initialize_config_module("robot_rl.configs", version_base=None):
        robot_cfg = OmegaConf.to_container(compose("deploy").robot, resolve=True)
    robot_store(
        tmp / "store",
        robot_cfg,
        task="lift the cube",
        draw=lambda rng, shape: rng.uniform(-0.5, 0.5, shape).astype(np.float32),
    )
    train_policy(
        tmp / "store", tmp / "run", "train.steps=3", "train.batch_size=4", "train.warmup_steps=1", *tiny_diffusion()
    )
    return tmp


def deploy_cfg(checkpoint, *overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(
            "deploy",
            overrides=[
                f"deploy.checkpoint={checkpoint}",
                "deploy.episodes=1",
                "deploy.max_episode_steps=10",
                "deploy.stop_on_success=false",
                "deploy.torch_threads=1",
                "deploy.executor=thread",
                *overrides,
            ],
        )


def test_deploy_sim_episode_summary_and_recording(lift_run):
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.commands.deploy import Deployer

    run = lift_run / "dep1"
    d = Deployer(deploy_cfg(lift_run / "run", f"deploy.record_path={lift_run / 'rollouts'}"), run, robot_given=False)
    assert d.robot_from == "checkpoint" and d.task == "lift the cube"
    s = d.run()
    assert json.loads((run / "summary.json").read_text())["episodes"] == 1
    for key in (
        "achieved_rate_hz",
        "overruns",
        "missed_slots",
        "lateness_p99_us",
        "work_p99_us",
        "inference_p50_ms",
        "inference_p99_ms",
        "chunk_budget_ms",
        "delay_ticks_max",
        "starvations",
        "safety_events",
        "success_rate",
        "episodes_detail",
        "warnings",
    ):
        assert key in s, key
    assert s["steps"] == 10 and s["error"] is None and s["inference"] == "async" and s["blend"] == "ensemble"
    assert s["chunk_budget_ms"] == pytest.approx(4 * 50.0)  # n_action_steps ticks at 20 Hz
    assert s["runner"]["chunks"] >= 2 and s["starvations"] == 0
    assert json.loads((run / "chunks.json").read_text())["chunks"][0]["delay_ticks"] == 0  # the primed chunk
    store = EpisodeStore.open(lift_run / "rollouts")
    assert store.num_episodes == 1 and store.meta["info"]["source"] == "deploy"
    ep = store.episode(0)
    assert len(ep["action"]) == 10 and np.isfinite(ep["policy_action"]).all()
    np.testing.assert_array_equal(ep["action"], np.clip(ep["policy_action"], -1, 1))  # no NaN, no rate limit


def test_deploy_nan_policy_is_caught_by_the_safety_filter(lift_run):
    from robot_rl.commands.deploy import Deployer

    run = lift_run / "dep_nan"
    cfg = deploy_cfg(lift_run / "run", "deploy.max_episode_steps=6", "deploy.video_episodes=1", "deploy.video_size=64")
    d = Deployer(cfg, run, robot_given=False)
    real = d.policy.predict_chunk
    d.policy.predict_chunk = lambda *a, **kw: real(*a, **kw) * float("nan")
    s = d.run()
    assert s["steps"] == 6 and s["error"] is None
    # every tick is caught: a NaN chunk by the safety filter, or (a loaded CPU delaying the next chunk) no chunk at
    # all, which sends the safe action too; the primed first chunk makes tick 0 a NaN one
    assert s["safety_events"]["nan"] >= 1 and s["safety_events"]["nan"] + s["starvations"] == 6, s["safety_events"]
    [video] = s["videos"]  # like eval: the episode as an mp4, named by seed and outcome
    assert video == str(run / "videos" / "episode_000_seed0_failure.mp4") and Path(video).stat().st_size > 0


def test_deploy_starved_ticks_send_the_safe_action(lift_run):
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.commands.deploy import Deployer

    d = Deployer(
        deploy_cfg(
            lift_run / "run",
            "deploy.max_action_age=3",
            "deploy.replan_every=2",
            f"deploy.record_path={lift_run / 'starved'}",
        ),
        lift_run / "dep_slow",
        robot_given=False,
    )
    real = d.policy.predict_chunk
    calls = []

    def slow(*a, **kw):  # warm-up + first chunk fast, then a model far too slow for its chunk
        calls.append(1)
        if len(calls) > 2:
            time.sleep(1.0)
        return real(*a, **kw)

    d.policy.predict_chunk = slow
    s = d.run()
    ep = EpisodeStore.open(lift_run / "starved").episode(0)
    starved = np.isnan(ep["policy_action"]).all(1)
    k = int(np.argmax(starved))  # ticks 0..2 come from the primed chunk, then nothing valid (7 of 10 steps,
    assert k >= 1 and starved[k:].all() and not starved[:k].any()  # fewer if a loaded CPU made the loop skip)
    assert s["starvations"] == s["safety_events"]["forced_safe"] == int(starved.sum()) >= 6
    # the safe action: no arm motion, the gripper holds its last command
    np.testing.assert_array_equal(ep["action"][k:, :6], 0.0)
    np.testing.assert_array_equal(ep["action"][k:, 6], ep["action"][k - 1, 6])
    assert any("no valid action" in w for w in s["warnings"])


def test_deploy_sync_mode_and_slow_warning(lift_run):
    from robot_rl.commands.deploy import Deployer

    s = Deployer(
        deploy_cfg(lift_run / "run", "deploy.inference=sync", "deploy.max_episode_steps=5", "deploy.rate_hz=1000"),
        lift_run / "dep_sync",
        robot_given=False,
    ).run()
    assert s["inference"] == "sync" and s["blend"] is None and s["runner"]["chunks"] >= 2
    assert s["chunk_budget_ms"] == pytest.approx(1.0)
    assert any("chunk inference p50" in w and "num_inference_steps" in w for w in s["warnings"])


def test_deploy_config_errors(lift_run, tmp_path):
    from robot_rl.commands.deploy import Deployer

    with pytest.raises(ConfigError, match="deploy.checkpoint is empty"):
        Deployer(deploy_cfg("null"), tmp_path)
    with pytest.raises(ConfigError, match="deploy.blend"):
        Deployer(deploy_cfg(lift_run / "run", "deploy.blend=average"), tmp_path)
    with pytest.raises(ConfigError, match="replan_every must be in 1..7"):
        Deployer(deploy_cfg(lift_run / "run", "deploy.replan_every=9"), tmp_path)
    with pytest.raises(ConfigError, match="is not a policy checkpoint"):
        Deployer(deploy_cfg(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match="observations"):  # a Stack robot does not produce Lift's cube_pos
        Deployer(deploy_cfg(lift_run / "run", "robot=stack"), tmp_path, robot_given=True)


def test_deploy_from_an_exported_artifact(lift_run):
    from robot_rl.commands.deploy import Deployer
    from robot_rl.policies.artifact import export_artifact

    export_artifact(lift_run / "run", lift_run / "artifact")
    d = Deployer(
        deploy_cfg(
            lift_run / "artifact",
            "deploy.max_episode_steps=4",
            "deploy.num_inference_steps=2",
            "deploy.max_delta=0.001",
        ),
        lift_run / "dep_art",
        robot_given=False,
    )
    assert d.robot_from == "checkpoint" and d.robot.name == "robosuite_Lift_Panda"
    s = d.run()
    assert s["policy_source"] == "artifact" and len(s["policy_sha256"]) == 64 and s["steps"] == 4
    assert s["num_inference_steps"] == 2 and s["error"] is None
    assert s["safety_events"]["rate_limit"] >= 1  # deploy.max_delta tightens the robot's rate limit


def test_deploy_teleop_takeover(lift_run):
    from robot_rl.commands.deploy import Deployer

    # a simulated human who takes over as soon as the policy deviates from the expert at all (3 ticks' patience)
    s = Deployer(
        deploy_cfg(
            lift_run / "run", "teleop=sim_intervener", "teleop.intervener.threshold=0.0", "deploy.max_episode_steps=12"
        ),
        lift_run / "dep_takeover",
        robot_given=False,
    ).run()
    ep = s["episodes_detail"][0]
    assert ep["policy_steps"] in (2, 3) and ep["teleop_steps"] == 12 - ep["policy_steps"] and ep["safe_steps"] == 0


def test_process_executor_matches_the_thread_and_reports_load_errors(lift_run):
    from robot_rl.data.episode_store import EpisodeStore
    from robot_rl.commands.deploy import Deployer
    from robot_rl.policies.inference_process import ProcessPredictor, decode_message, encode_message

    h, arrays = decode_message(
        encode_message({"op": "x"}, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0,), np.int64)})
    )
    assert h == {"op": "x"} and arrays["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and arrays["b"].shape == (0,)

    first = {}
    for executor in ("thread", "process"):
        d = Deployer(
            deploy_cfg(
                lift_run / "run",
                "deploy.max_episode_steps=3",
                f"deploy.executor={executor}",
                f"deploy.record_path={lift_run / ('rec_' + executor)}",
            ),
            lift_run / f"dep_{executor}",
            robot_given=False,
        )
        s = d.run()
        assert s["executor"] == executor and s["error"] is None and s["steps"] == 3
        first[executor] = EpisodeStore.open(lift_run / f"rec_{executor}").episode(0)["policy_action"][0]
    # same seed, same warm-up draws, same observation: the child computes the very same first chunk
    np.testing.assert_array_equal(first["thread"], first["process"])

    with pytest.raises(RuntimeError, match="could not load the policy(.|\n)*is not a policy checkpoint"):
        ProcessPredictor(
            "robot_rl.commands.deploy:worker_policy", {"checkpoint": str(lift_run / "nope"), "device": "cpu"}
        )


def test_prime_failure_is_reported_not_raised():
    r = AsyncChunkRunner(TickPolicy(fail_on=1), 20.0, warmup=0).start()
    try:
        r.reset()
        r.prime(obs(0))
        assert r.failed and "boom" in r.error_traceback
        r.observe(obs(0), 0)
        assert r.action_for(0) is None
    finally:
        r.stop()


def test_deploy_single_action_mlp_runs_synchronously(lift_run):
    from robot_rl.commands.deploy import Deployer

    train_policy(
        lift_run / "store",
        lift_run / "mlp",
        "train.steps=2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "policy=mlp",
        "policy.hidden=[16]",
    )
    s = Deployer(
        deploy_cfg(lift_run / "mlp", "deploy.max_episode_steps=4", "deploy.executor=process"),
        lift_run / "dep_mlp",
        robot_given=False,
    ).run()
    assert s["policy_type"] == "MLPPolicy" and s["inference"] == "sync" and s["executor"] is None
    assert s["runner"]["mode"] == "sync" and s["runner"]["chunks"] == 4 and s["steps"] == 4 and s["error"] is None


def test_deploy_with_rerun_view(lift_run):
    pytest.importorskip("rerun")
    from robot_rl.commands.deploy import Deployer

    run = lift_run / "dep_viz"
    s = Deployer(deploy_cfg(lift_run / "run", "deploy.viz=rerun"), run, robot_given=False).run()
    assert s["viz"]["error"] is None and s["viz"]["ticks"] == s["steps"] > 0
    assert (run / "viz.rrd").stat().st_size > 0 and s["viz"]["logged"] + s["viz"]["dropped"] == s["steps"]
