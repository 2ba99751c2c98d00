"""The one-step student of a diffusion policy (consistency distillation): the teacher's shape with sample
prediction and a one-step DDIM schedule, so `predict_chunk` runs one UNet pass. Made here once for
`robot-rl distill` (robot_rl/commands/distill.py) and RL-100's online distillation (robot_rl/algos/rl100_online.py)."""

from __future__ import annotations

import torch

from robot_rl.policies.diffusion import DiffusionConfig, DiffusionPolicy


def make_student(teacher: DiffusionPolicy, init: str = "teacher") -> DiffusionPolicy:
    """A one-step policy of the teacher's shape (sample prediction, DDIM with 1 step), with the teacher's
    normaliser and encoder; `init=teacher` also copies the UNet (warm start), `random` leaves it freshly initialised."""
    cfg = DiffusionConfig.from_dict(
        {
            **teacher.cfg.to_dict(),
            "obs_keys": list(teacher.obs_keys),
            "prediction_type": "sample",
            "inference_scheduler": "ddim",
            "num_inference_steps": 1,
            "eta": 0.0,  # the student maps x_T to the teacher's deterministic chunk, whatever sampler the teacher deploys
        }
    )
    student = DiffusionPolicy(cfg, teacher.obs_features, teacher.action_feature).to(teacher.device)
    if init == "teacher":
        student.load_state_dict(teacher.state_dict())
    elif init == "random":
        student.normalizer.load_state_dict(teacher.normalizer.state_dict())
        student.obs_encoder.load_state_dict(teacher.obs_encoder.state_dict())
    else:
        raise ValueError(f"init must be teacher or random, got {init!r}")
    return student


def one_step_timestep(policy: DiffusionPolicy) -> torch.Tensor:
    """The timestep the one-step DDIM schedule feeds the UNet (what `predict_chunk` will use at inference)."""
    sched = policy.schedulers["ddim"]
    sched.set_timesteps(1, device=policy.device)
    return sched.timesteps[0].clone()
