"""robot_rl.commands.distill: one-step consistency distillation of a diffusion policy (RL-100 action_same_noise)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file

from robot_rl.config import ConfigError
from robot_rl.data.episode_store import EpisodeStore
from robot_rl.commands.distill import Distiller, main, make_student, one_step_timestep
from robot_rl.commands.evaluate import is_one_step, set_sampler
from robot_rl.interfaces import Feature
from robot_rl.policies.diffusion import DiffusionPolicy
from robot_rl.policies.checkpoint import load_policy

from builders import tiny_diffusion, toy_store, train_policy

pytestmark = pytest.mark.usefixtures("one_thread")  # module scope: before the module-scoped teacher is trained
ROBOT_INFO = {"robot": "toy", "robot_config": {"type": "toy", "horizon": 20}, "task": "follow"}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny diffusion policy trained briefly on the toy store (the teacher)."""
    tmp = tmp_path_factory.mktemp("teacher")
    toy_store(tmp / "store", success_column=False, info=ROBOT_INFO)
    return train_policy(
        tmp / "store",
        tmp / "run",
        "train.steps=100",
        "train.batch_size=32",
        "train.lr=3e-3",
        "train.warmup_steps=5",
        *tiny_diffusion(down_dims=[32, 64], num_inference_steps=5),
    )


def distill_cfg(teacher, *overrides):
    with initialize_config_module("robot_rl.configs", version_base=None):
        return compose(
            "distill",
            overrides=[
                f"distill.teacher={teacher}",
                "distill.progress=false",
                "distill.batch_size=32",
                "distill.lr=3e-3",
                "distill.warmup_steps=5",
                "distill.teacher_steps=5",
                "distill.probe_size=64",
                "distill.eval_episodes=0",
                "distill.log_every=5",
                "distill.ema_decay=0.9",
                *overrides,
            ],
        )


def _window(store_path, n=16):
    from robot_rl.data.sequence import SequenceSampler

    s = SequenceSampler.from_store(EpisodeStore.open(store_path), ["obs.state"], obs_horizon=2, action_horizon=8)
    return {"obs.state": torch.as_tensor(s.get(np.arange(0, 6 * 20, 120 // n))["obs.state"])}


def test_distillation_learns_the_teacher_chunk(teacher_run, tmp_path):
    cfg = distill_cfg(teacher_run, "distill.steps=80", "distill.val_every=20", "distill.checkpoint_every=40")
    dist = Distiller(cfg, tmp_path / "run")
    assert dist.data_path == (teacher_run.parent / "store")  # default: the teacher's training store
    teacher = load_policy(teacher_run)
    window = _window(dist.data_path)
    noise = torch.randn(window["obs.state"].shape[0], 8, 2, generator=torch.Generator().manual_seed(1))
    target = teacher.predict_chunk(window, init_noise=noise, num_inference_steps=5, scheduler="ddim")
    err_before = float(((dist.model.predict_chunk(window, init_noise=noise) - target) ** 2).mean())

    s = dist.run()
    assert s["finished"] and s["step"] == 80
    # the loss falls, and the one-step chunk approaches the teacher's DDIM chunk from the same noise
    assert np.mean(dist.losses[-10:]) < 0.4 * np.mean(dist.losses[:10]), dist.losses
    probes = [e for _, e in dist.probe_history]
    assert [st for st, _ in dist.probe_history] == [0, 20, 40, 60, 80]
    assert probes[-1] < 0.4 * probes[0], probes
    student = load_policy(tmp_path / "run")
    err_after = float(((student.predict_chunk(window, init_noise=noise) - target) ** 2).mean())
    assert err_after < 0.4 * err_before, (err_before, err_after)

    # the checkpoint: train's layout (one policy format), and it says what it is and which robot it drives
    ckpt = tmp_path / "run" / "checkpoints" / "step_80"
    for name in (
        "manifest.json",
        "policy.safetensors",
        "raw_policy.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "config.yaml",
    ):
        assert (ckpt / name).exists(), name
    assert (tmp_path / "run" / "checkpoints" / "step_40" / "policy.safetensors").exists()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["training"]["distilled"]["one_step"] is True
    assert manifest["training"]["distilled"]["teacher_steps"] == 5 and manifest["training"]["source"] == "distill"
    pc = manifest["config"]
    assert (pc["prediction_type"], pc["inference_scheduler"], pc["num_inference_steps"]) == ("sample", "ddim", 1)
    teacher_manifest = load_policy(teacher_run).manifest
    assert manifest["robot"] == teacher_manifest["robot"] and manifest["robot"]["config"] == ROBOT_INFO["robot_config"]
    assert manifest["fps"] == teacher_manifest["fps"] == 10
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert len(state["losses"]) == 80 and state["teacher"] == str(dist.teacher_ckpt)
    assert (tmp_path / "run" / "distill_summary.json").exists()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))


def test_student_loads_and_acts_like_a_diffusion_policy(teacher_run, tmp_path):
    dist = Distiller(
        distill_cfg(teacher_run, "distill.steps=3", "distill.val_every=0", "distill.tensorboard=false"),
        tmp_path / "run",
    )
    dist.run()
    student = load_policy(tmp_path / "run")
    assert isinstance(student, DiffusionPolicy) and is_one_step(student) and not student.training
    assert set_sampler(student) == "one-step"
    with pytest.raises(ConfigError, match="one-step"):
        set_sampler(student, "ddpm")
    # predict_chunk (stock DDIM, one step) is exactly one forward pass of the UNet, clamped
    window = _window(dist.data_path, 4)
    x = torch.randn(4, 8, 2)
    t = one_step_timestep(student)
    with torch.no_grad():
        direct = student.normalizer.unnormalize(
            "action", student.unet(x, t.expand(4), student.encode_obs(window)).clamp(-1, 1)
        )
    assert torch.allclose(student.predict_chunk(window, init_noise=x), direct, atol=1e-6)
    # select_action: chunking and the action queue as for any diffusion policy
    student.reset()
    acts = [student.select_action({"state": np.full(4, 0.1 * i, np.float32)}) for i in range(9)]
    assert all(a.shape == (2,) and np.isfinite(a).all() for a in acts)
    assert student.num_predictions == 3  # n_action_steps=4: chunks at calls 1, 5 and 9


def test_warm_start_copies_the_teacher_and_ddim_chunk_matches_predict_chunk(teacher_run):
    teacher = load_policy(teacher_run)
    student = make_student(teacher, init="teacher")
    ts, ss = teacher.state_dict(), student.state_dict()
    assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
    fresh = make_student(teacher, init="random")
    assert torch.equal(fresh.normalizer.stat("action", "min"), teacher.normalizer.stat("action", "min"))
    assert not torch.equal(fresh.unet.final[1].weight, teacher.unet.final[1].weight)
    window = _window(teacher_run.parent / "store", 4)
    x = torch.randn(4, 8, 2)
    ours = teacher.normalizer.unnormalize("action", teacher.denoise(x, teacher.encode_obs(window), 5))
    assert torch.allclose(
        ours, teacher.predict_chunk(window, init_noise=x, num_inference_steps=5, scheduler="ddim"), atol=1e-6
    )


def test_student_of_a_chain_teacher_is_deterministic(teacher_run):
    """A teacher that deploys the stochastic DDIM chain (eta > 0, RL-100) still gets a one-step student that maps
    x_T to one chunk: the student never inherits the teacher's sampler noise."""
    teacher = load_policy(teacher_run)
    teacher.cfg.eta, teacher.cfg.std_min = 1.0, 0.05
    student = make_student(teacher)
    assert student.cfg.eta == 0.0 and set_sampler(student) == "one-step"
    assert set_sampler(teacher) == f"ddim-{teacher.cfg.num_inference_steps} eta=1"


def test_resume_repeats_the_uninterrupted_run(teacher_run, tmp_path):
    over = ["distill.steps=8", "distill.checkpoint_every=4", "distill.tensorboard=false", "distill.val_every=0"]
    straight = Distiller(distill_cfg(teacher_run, *over), tmp_path / "a")
    straight.run()
    first = Distiller(distill_cfg(teacher_run, *over), tmp_path / "b")
    assert first.run(stop_after=4)["step"] == 4
    resumed = Distiller(distill_cfg(teacher_run, *over, "distill.resume=true"), tmp_path / "b")
    assert resumed.step == 4
    assert resumed.run()["finished"]
    assert resumed.losses == straight.losses and len(resumed.losses) == 8
    for name in ("policy.safetensors", "raw_policy.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step_8" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step_8" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_config_errors(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher is empty"):
        Distiller(distill_cfg("null"), tmp_path / "r")
    with pytest.raises(ConfigError, match="distill.teacher"):
        Distiller(distill_cfg(tmp_path / "nowhere"), tmp_path / "r")
    with pytest.raises(ConfigError, match="loss_rows"):
        Distiller(distill_cfg(teacher_run, "distill.loss_rows=some"), tmp_path / "r")
    with pytest.raises(ConfigError, match="distill.steps"):
        Distiller(distill_cfg(teacher_run, "distill.steps=0"), tmp_path / "r")
    with pytest.raises(ConfigError, match="teacher_steps"):
        Distiller(distill_cfg(teacher_run, "distill.teacher_steps=1000"), tmp_path / "r")
    with pytest.raises(ConfigError, match="nothing to resume"):
        Distiller(distill_cfg(teacher_run, "distill.resume=true"), tmp_path / "r")
    with pytest.raises(ConfigError, match="not an episode store"):
        Distiller(distill_cfg(teacher_run, f"distill.data={tmp_path / 'nowhere'}"), tmp_path / "r")
    other = tmp_path / "other_store"  # a store without the teacher's observation
    st = EpisodeStore.create(other, {"obs.other": Feature((4,)), "action": Feature((2,))}, fps=10)
    w = st.writer()
    w.begin()
    for _ in range(3):
        w.add({"obs.other": np.zeros(4, np.float32), "action": np.zeros(2, np.float32)})
    w.save()
    st.close()
    with pytest.raises(ConfigError, match="lacks what the teacher observes"):
        Distiller(distill_cfg(teacher_run, f"distill.data={other}"), tmp_path / "r")
    # a distilled student cannot be a teacher
    main(
        distill_cfg(teacher_run, "distill.steps=1", "distill.val_every=0", "distill.tensorboard=false"),
        tmp_path / "student",
    )
    with pytest.raises(ConfigError, match="already a one-step"):
        Distiller(distill_cfg(tmp_path / "student"), tmp_path / "r2")
