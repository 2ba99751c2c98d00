"""A Bradley–Terry reward model over camera frames: an ensemble of small CNNs trained from scratch on preferences.

P(frame 2 preferred over frame 1) = exp r(f2) / (exp r(f1) + exp r(f2)), so the loss of one labelled pair is the
cross-entropy of softmax([r(f1), r(f2)]) against the label (0: frame 1 better, 1: frame 2 better); pairs labelled
-1 (no preference) are dropped (RL-VLM-F `reward_model.py`, reference §2.4). Each member is a random-init CNN
(RL-VLM-F's kernels 5/3/3/3, strides 3/2/2/2) and sees its own random batches; the reward is the members' mean,
standardised over the frames it was fitted on (BT rewards are only defined up to a shift and scale).

Saved as a directory: `reward_model.safetensors` (weights + standardisation buffers) and `reward_model.json`
(architecture, image key, fit metrics); `load_reward_model(dir)` rebuilds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from robot_rl.policies.encoders import RandomShift

WEIGHTS, CONFIG = "reward_model.safetensors", "reward_model.json"


class RewardCNN(nn.Module):
    """uint8 frames (B, H, W, C) -> scalar rewards (B,)."""

    def __init__(self, image_shape, channels, kernels, strides, hidden: int):
        super().__init__()
        h, w, c = (int(x) for x in image_shape)
        layers, last = [], c
        for ch, k, s in zip(channels, kernels, strides):
            layers += [nn.Conv2d(last, int(ch), int(k), stride=int(s)), nn.LeakyReLU(0.01)]
            last = int(ch)
        self.conv = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, c, h, w)).numel()
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, int(hidden)), nn.LeakyReLU(0.01), nn.Linear(int(hidden), 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x)).squeeze(-1)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255.0


class RewardEnsemble(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.members = nn.ModuleList(
            RewardCNN(c["image_shape"], c["channels"], c["kernels"], c["strides"], c["hidden"])
            for _ in range(int(c["members"]))
        )
        self.shift = RandomShift(int(c.get("random_shift_pad", 0)))
        self.register_buffer("out_mean", torch.zeros(()))
        self.register_buffer("out_std", torch.ones(()))

    def member_rewards(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 frames (M, B, H, W, C), one batch per member -> raw rewards (M, B) (training; random shift on)."""
        return torch.stack([m(self.shift(to_float(x))) for m, x in zip(self.members, images)])

    def bt_loss(self, first: torch.Tensor, second: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Bradley–Terry cross-entropy summed over members; (M, B, ...) frames and (M, B) labels in {0, 1}."""
        logits = torch.stack([self.member_rewards(first), self.member_rewards(second)], dim=-1)  # (M, B, 2)
        loss = F.cross_entropy(logits.flatten(0, 1), label.flatten().long(), reduction="mean") * len(self.members)
        acc = (logits.argmax(-1) == label).float().mean()
        return loss, {"pair_accuracy": acc.item()}

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> torch.Tensor:
        """Members' mean reward of uint8 frames (B, H, W, C), unstandardised, shift off."""
        x = to_float(images)
        return torch.stack([m(x) for m in self.members]).mean(0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised reward of uint8 frames (B, H, W, C) -> (B,)."""
        return (self.raw(images) - self.out_mean) / self.out_std

    @torch.no_grad()
    def rewards(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        """Standardised rewards of a whole array of frames, in batches, in eval mode."""
        was = self.training
        self.eval()
        device = self.out_mean.device
        out = [
            self(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)).cpu()
            for i in range(0, len(images), batch)
        ]
        self.train(was)
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    @torch.no_grad()
    def fit_standardisation(self, images: np.ndarray, batch: int = 256) -> None:
        self.out_mean.zero_()
        self.out_std.fill_(1.0)
        r = self.rewards(images, batch)
        self.out_mean.fill_(float(r.mean()))
        self.out_std.fill_(float(max(r.std(), 1e-6)))

    @torch.no_grad()
    def pair_accuracy(self, first: np.ndarray, second: np.ndarray, label: np.ndarray, batch: int = 256) -> float:
        """Fraction of pairs the ensemble mean orders as labelled (held-out pairs)."""
        if len(label) == 0:
            return float("nan")
        r1, r2 = self.rewards(first, batch), self.rewards(second, batch)
        return float(np.mean((r2 > r1).astype(int) == label))


def save_reward_model(directory: str | os.PathLike, model: RewardEnsemble, info: dict) -> Path:
    """Weights + config into `directory` (tmp + rename per file)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / (WEIGHTS + ".tmp")))
    os.replace(d / (WEIGHTS + ".tmp"), d / WEIGHTS)
    (d / (CONFIG + ".tmp")).write_text(json.dumps({"config": model.config, **info}, indent=1, default=float))
    os.replace(d / (CONFIG + ".tmp"), d / CONFIG)
    return d


def find_reward_model(path: str | os.PathLike) -> Path:
    """A reward-model directory, or a `robot-rl reward-model` run directory holding one under reward_model/."""
    p = Path(path).expanduser()
    for d in (p, p / "reward_model"):
        if (d / CONFIG).is_file() and (d / WEIGHTS).is_file():
            return d
    raise FileNotFoundError(
        f"{p} holds no reward model ({CONFIG} + {WEIGHTS}); fit one with robot-rl reward-model and pass its run dir"
    )


def load_reward_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[RewardEnsemble, dict]:
    d = find_reward_model(path)
    info = json.loads((d / CONFIG).read_text())
    model = RewardEnsemble(info["config"])
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    return model.to(device).eval(), info
