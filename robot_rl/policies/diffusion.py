"""Diffusion Policy (Chi et al., RSS'23), CNN variant: a conditional 1-D UNet denoises an action chunk.

Conventions follow real-stanford/diffusion_policy:

* The model predicts `action_horizon` (Ha) actions conditioned on the last `obs_horizon` (To) observations; the
  chunk starts at the oldest observation (the window SequenceSampler builds), so the action for "now" is row
  To-1 and `select_action` executes rows To-1 .. To-1+n_action_steps-1 before predicting again.
* Conditioning is global FiLM: the To frames' features (normalised low-dim vectors + per-camera conv features)
  are flattened and concatenated with a sinusoidal diffusion-step embedding; every residual block maps that
  to a per-channel scale and bias.
* Training: diffusers `DDPMScheduler` (100 steps, squaredcos_cap_v2, clip_sample, epsilon prediction), MSE
  between predicted and true noise, masked where `action_is_pad`.
* Inference: DDPM (all train steps, stochastic) or DDIM (`num_inference_steps`, e.g. 10; eta 0, deterministic
  given the starting noise), chosen by `inference_scheduler`.
* Normalisation statistics (min/max -> [-1, 1] for actions and low-dim observations, images /255 -> [-1, 1])
  are buffers of the module (robot_rl.policies.normalizer), so they live in the state_dict / safetensors.

`EMA` keeps diffusion_policy's exponential moving average of the weights (decay warm-up
1 - (1 + step)^-power, capped at max_decay; or a fixed decay). The trainer acts and checkpoints with the EMA copy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl.interfaces import OBS_PREFIX, Feature, Observation, Policy
from robot_rl.policies.encoders import ObsEncoder
from robot_rl.policies.normalizer import Normalizer
from robot_rl.sim.registry import is_concatenation

# ------------------------------------------------------------------------------------------------- config


@dataclass
class ImageEncoderConfig:
    feature_dim: int = 64
    channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    strides: list[int] = field(default_factory=lambda: [2, 2, 1, 1])
    pool: str = "spatial_softmax"  # spatial_softmax | avg
    num_keypoints: int = 32
    n_groups: int = 8
    random_shift_pad: int = 4  # DrQ random shift (train mode only); 0 = off


@dataclass
class DiffusionConfig:
    obs_keys: list[str] | None = None  # null = every 1-D float observation + every camera, sorted by name
    obs_horizon: int = 2  # To
    action_horizon: int = 16  # Ha, predicted chunk length
    n_action_steps: int = 8  # executed per chunk
    # UNet
    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    film_scale: bool = True  # FiLM scale + bias (False: bias only)
    # noise schedule
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    clip_sample: bool = True
    prediction_type: str = "epsilon"  # epsilon | sample
    inference_scheduler: str = "ddim"  # ddim | ddpm
    num_inference_steps: int | None = 10  # null = num_train_timesteps
    # deployed sampler (the chain RL trained, RL-100 online): eta 0 = deterministic DDIM from the seeded x_T; eta > 0
    # = the stochastic DDIM chain with per-step std clipped to [std_min, std_max]. These defaults only keep
    # manifests written before the fields existed loading as they were (eta 0); configs set them in YAML.
    eta: float = 0.0
    std_min: float = 0.0
    std_max: float | None = None
    # normalisation / encoders
    lowdim_norm: str = "minmax"  # minmax | meanstd (actions are always minmax)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DiffusionConfig:
        d = dict(d or {})
        d.pop("type", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"policy: unknown diffusion policy keys {unknown}; known: {sorted(names)}")
        img = dict(d.pop("image", None) or {})
        img_names = {f.name for f in dataclasses.fields(ImageEncoderConfig)}
        if set(img) - img_names:
            raise ValueError(f"policy.image: unknown keys {sorted(set(img) - img_names)}; known: {sorted(img_names)}")
        for k in ("down_dims",):
            if k in d and d[k] is not None:
                d[k] = [int(x) for x in d[k]]
        if d.get("obs_keys") is not None:
            d["obs_keys"] = [str(k) for k in d["obs_keys"]]
        cfg = cls(**d, image=ImageEncoderConfig(**img))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return {"type": "diffusion", **dataclasses.asdict(self)}

    def validate(self) -> None:
        if self.obs_horizon < 1 or self.action_horizon < 1 or self.n_action_steps < 1:
            raise ValueError("policy.obs_horizon, action_horizon and n_action_steps must be >= 1")
        if self.obs_horizon - 1 + self.n_action_steps > self.action_horizon:
            raise ValueError(
                f"policy: obs_horizon - 1 + n_action_steps ({self.obs_horizon - 1 + self.n_action_steps})"
                f" must not exceed action_horizon ({self.action_horizon}): the executed actions are "
                f"rows obs_horizon-1 .. obs_horizon-2+n_action_steps of the chunk"
            )
        factor = 2 ** (len(self.down_dims) - 1)
        if not self.down_dims or self.action_horizon % factor:
            raise ValueError(
                f"policy.action_horizon ({self.action_horizon}) must be divisible by "
                f"2^(len(down_dims)-1) = {factor} (the UNet halves the chunk length per level)"
            )
        if self.inference_scheduler not in ("ddim", "ddpm"):
            raise ValueError(f"policy.inference_scheduler must be ddim or ddpm, got {self.inference_scheduler!r}")
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"policy.prediction_type must be epsilon or sample, got {self.prediction_type!r}")
        if self.lowdim_norm not in ("minmax", "meanstd"):
            raise ValueError(f"policy.lowdim_norm must be minmax or meanstd, got {self.lowdim_norm!r}")
        n = self.num_inference_steps
        if n is not None and not 1 <= n <= self.num_train_timesteps:
            raise ValueError(f"policy.num_inference_steps must be in 1..num_train_timesteps, got {n}")
        if not self.eta >= 0 or not self.std_min >= 0 or (self.std_max is not None and not self.std_max > 0):
            raise ValueError(
                f"policy.eta ({self.eta}) and policy.std_min ({self.std_min}) must be >= 0 and policy.std_max "
                f"({self.std_max}) > 0 or null"
            )
        if self.eta > 0 and self.inference_scheduler != "ddim":
            raise ValueError("policy.eta > 0 (the stochastic DDIM chain) needs policy.inference_scheduler ddim")


# --------------------------------------------------------------------------------------------------- UNet


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int = 8):
        super().__init__(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(n_groups, c_out), nn.Mish()
        )


class ConditionalResBlock1d(nn.Module):
    """Two Conv1dBlocks with FiLM conditioning between them, plus a residual connection."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int, film_scale: bool):
        super().__init__()
        self.conv1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film_scale = film_scale
        self.c_out = c_out
        self.cond = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, c_out * 2 if film_scale else c_out))
        self.residual = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        emb = self.cond(cond).unsqueeze(-1)
        out = emb[:, : self.c_out] * out + emb[:, self.c_out :] if self.film_scale else out + emb
        return self.conv2(out) + self.residual(x)


class ConditionalUnet1d(nn.Module):
    """(B, T, A) noisy chunk, (B,) timesteps, (B, global_cond_dim) -> (B, T, A)."""

    def __init__(
        self,
        action_dim: int,
        global_cond_dim: int,
        down_dims: list[int],
        kernel_size: int = 5,
        n_groups: int = 8,
        diffusion_step_embed_dim: int = 128,
        film_scale: bool = True,
    ):
        super().__init__()
        dsed = diffusion_step_embed_dim
        self.step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        cond_dim = dsed + global_cond_dim
        kw = dict(cond_dim=cond_dim, kernel_size=kernel_size, n_groups=n_groups, film_scale=film_scale)
        in_out = list(zip([action_dim, *down_dims[:-1]], down_dims))
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.down.append(
                nn.ModuleList(
                    [
                        ConditionalResBlock1d(c_in, c_out, **kw),
                        ConditionalResBlock1d(c_out, c_out, **kw),
                        nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, 2, 1),
                    ]
                )
            )
        mid = down_dims[-1]
        self.mid = nn.ModuleList([ConditionalResBlock1d(mid, mid, **kw), ConditionalResBlock1d(mid, mid, **kw)])
        self.up = nn.ModuleList()
        for c_out, c_in in reversed(in_out[1:]):  # c_in: deeper level's width; skip connection doubles it
            self.up.append(
                nn.ModuleList(
                    [
                        ConditionalResBlock1d(c_in * 2, c_out, **kw),
                        ConditionalResBlock1d(c_out, c_out, **kw),
                        nn.ConvTranspose1d(c_out, c_out, 4, 2, 1),
                    ]
                )
            )
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1)
        )

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, A, T)
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        cond = torch.cat([self.step_encoder(timestep.to(x.device)), global_cond], dim=-1)
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, cond), cond))
        return self.final(x).transpose(1, 2)


# ---------------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    decay(step) = 1 - (1 + step / inv_gamma) ** -power clipped to [min_decay, max_decay] (diffusion_policy's
    EMAModel: 0 at the first update, ~0.997 after 2k updates, -> max_decay), or `decay` when it is set (fixed).
    """

    def __init__(
        self,
        model: nn.Module,
        power: float = 0.75,
        max_decay: float = 0.9999,
        min_decay: float = 0.0,
        inv_gamma: float = 1.0,
        decay: float | None = None,
    ):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.power, self.max_decay, self.min_decay, self.inv_gamma = power, max_decay, min_decay, inv_gamma
        self.fixed_decay = decay
        self.step_count = 0

    def get_decay(self, step: int) -> float:
        if self.fixed_decay is not None:
            return float(self.fixed_decay)
        if step <= 0:
            return 0.0
        value = 1.0 - (1.0 + step / self.inv_gamma) ** -self.power
        return float(min(self.max_decay, max(self.min_decay, value)))

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        decay = self.get_decay(self.step_count)
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            if p.requires_grad:
                ema_p.lerp_(p.detach(), 1.0 - decay)
            else:
                ema_p.copy_(p.detach())
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.step_count += 1
        return decay

    def state(self) -> dict:
        return {"step_count": self.step_count}

    def load_state(self, state: dict) -> None:
        self.step_count = int(state["step_count"])


# ------------------------------------------------------------------------------------------------- policy


def _strip(key: str) -> str:
    return key[len(OBS_PREFIX) :] if key.startswith(OBS_PREFIX) else key


def default_obs_keys(obs_features: Mapping[str, Feature]) -> list[str]:
    """Every 1-D float observation (not robosuite's concatenations of others), then every camera, sorted by name."""
    low = sorted(
        k
        for k, f in obs_features.items()
        if not f.is_image
        and len(f.shape) == 1
        and np.issubdtype(np.dtype(f.dtype), np.floating)
        and not is_concatenation(k)  # robosuite's object-state / robot0_proprio-state repeat other keys
    )
    return low + sorted(k for k, f in obs_features.items() if f.is_image)


def _lookup(obs: Mapping[str, Any], key: str):
    """Observation `key` from a dict keyed by robot names or by store names (`obs.<key>`)."""
    if key in obs:
        return obs[key]
    if OBS_PREFIX + key in obs:
        return obs[OBS_PREFIX + key]
    raise KeyError(f"observation {key!r} missing (keys: {sorted(obs)})")


class DiffusionPolicy(nn.Module, Policy):
    """Diffusion Policy over action chunks. Build with `from_store_features` / `from_features`."""

    def __init__(self, cfg: DiffusionConfig, obs_features: Mapping[str, Feature], action_feature: Feature):
        nn.Module.__init__(self)
        cfg.validate()
        self.cfg = cfg
        self.obs_features = dict(obs_features)
        self.action_feature = action_feature
        self.obs_keys = list(self.obs_features)
        self.image_keys = [k for k in self.obs_keys if self.obs_features[k].is_image]
        self.lowdim_keys = [k for k in self.obs_keys if not self.obs_features[k].is_image]
        self.action_dim = int(np.prod(action_feature.shape))
        specs = {k: ("image" if f.is_image else cfg.lowdim_norm, tuple(f.shape)) for k, f in self.obs_features.items()}
        specs["action"] = ("minmax", (self.action_dim,))
        self.normalizer = Normalizer(specs)
        ic = cfg.image
        self.obs_encoder = ObsEncoder(
            {k: int(np.prod(self.obs_features[k].shape)) for k in self.lowdim_keys},
            {k: tuple(self.obs_features[k].shape) for k in self.image_keys},
            feature_dim=ic.feature_dim,
            channels=ic.channels,
            strides=ic.strides,
            pool=ic.pool,
            num_keypoints=ic.num_keypoints,
            n_groups=ic.n_groups,
            random_shift_pad=ic.random_shift_pad,
        )
        self.unet = ConditionalUnet1d(
            self.action_dim,
            self.obs_encoder.out_dim * cfg.obs_horizon,
            cfg.down_dims,
            cfg.kernel_size,
            cfg.n_groups,
            cfg.diffusion_step_embed_dim,
            cfg.film_scale,
        )
        from diffusers import DDIMScheduler, DDPMScheduler

        sched_kw = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            clip_sample=cfg.clip_sample,
            prediction_type=cfg.prediction_type,
        )
        self.noise_scheduler = DDPMScheduler(**sched_kw)  # training (add_noise) and DDPM inference
        self.schedulers = {
            "ddpm": DDPMScheduler(**sched_kw),
            "ddim": DDIMScheduler(**sched_kw, set_alpha_to_one=True, steps_offset=0),
        }
        self.generator: torch.Generator | None = None  # select_action's noise source (None: torch's global RNG)
        self.num_predictions = 0  # chunks predicted since construction (select_action bookkeeping)
        self._obs_queue: deque = deque(maxlen=cfg.obs_horizon)
        self._action_queue: deque = deque()

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_features(
        cls, obs_features: Mapping[str, Feature], action_feature: Feature, cfg: DiffusionConfig | Mapping[str, Any]
    ) -> DiffusionPolicy:
        """From a robot's `observation_features` (plain names) and `action_feature`."""
        if not isinstance(cfg, DiffusionConfig):
            cfg = DiffusionConfig.from_dict(cfg)
        if cfg.obs_keys:
            keys = [_strip(k) for k in cfg.obs_keys]
            missing = [k for k in keys if k not in obs_features]
            if missing:
                raise ValueError(f"policy.obs_keys {missing} are not observations; available: {sorted(obs_features)}")
        else:
            keys = default_obs_keys(obs_features)
        if not keys:
            raise ValueError("the diffusion policy found no usable observation (1-D float vectors or uint8 images)")
        return cls(cfg, {k: obs_features[k] for k in keys}, action_feature)

    @classmethod
    def from_store_features(
        cls, features: Mapping[str, Feature], cfg: DiffusionConfig | Mapping[str, Any], action_key: str = "action"
    ) -> DiffusionPolicy:
        """From an episode store's features (`obs.<name>` observations, `action`)."""
        obs = {k[len(OBS_PREFIX) :]: f for k, f in features.items() if k.startswith(OBS_PREFIX)}
        if action_key not in features:
            raise ValueError(f"the store has no {action_key!r} key; keys: {sorted(features)}")
        return cls.from_features(obs, features[action_key], cfg)

    def fit_normalizer(self, data: Mapping[str, np.ndarray]) -> None:
        """Statistics from arrays keyed by robot names or store names (`obs.<k>`), plus `action`."""
        self.normalizer.fit({k: _lookup(data, k) for k in self.lowdim_keys} | {"action": data["action"]})

    def fit_normalizer_from_store(self, store) -> None:
        data = {k: store.array(OBS_PREFIX + k) for k in self.lowdim_keys}
        self.fit_normalizer(data | {"action": store.array("action")})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def store_obs_keys(self) -> list[str]:
        return [OBS_PREFIX + k for k in self.obs_keys]

    @property
    def horizons(self) -> tuple[int, int]:
        """(obs_horizon, action_horizon) of its training windows."""
        return self.cfg.obs_horizon, self.cfg.action_horizon

    def features_dict(self) -> dict:
        """JSON description of what the policy reads and writes (checkpoints rebuild the policy from it)."""
        return {"obs": {k: f.to_dict() for k, f in self.obs_features.items()}, "action": self.action_feature.to_dict()}

    # -------------------------------------------------------------------------------------------- networks
    def _tensor(self, x) -> torch.Tensor:
        return (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).to(self.device)

    def encode_obs(self, obs_window: Mapping[str, Any]) -> torch.Tensor:
        """Raw observation window (B, To, ...) -> global conditioning (B, To * obs_dim)."""
        to = self.cfg.obs_horizon
        normed, batch = {}, None
        for k in self.obs_keys:
            x = self._tensor(_lookup(obs_window, k))
            f = self.obs_features[k]
            if x.dim() != len(f.shape) + 2 or x.shape[1] != to:
                raise ValueError(
                    f"observation {k!r}: expected (B, {to}, {', '.join(map(str, f.shape))}), got {tuple(x.shape)}"
                )
            batch = x.shape[0]
            normed[k] = self.normalizer.normalize(k, x.reshape(batch * to, *x.shape[2:]))
        return self.obs_encoder(normed).reshape(batch, -1)

    def compute_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Denoising loss on a training batch: obs keys (B, To, ...), `action` (B, Ha, A), `action_is_pad` (B, Ha)."""
        cond = self.encode_obs(batch)
        action = self._tensor(batch["action"]).float()
        if action.shape[1:] != (self.cfg.action_horizon, self.action_dim):
            raise ValueError(
                f"action: expected (B, {self.cfg.action_horizon}, {self.action_dim}), got {tuple(action.shape)}"
            )
        x0 = self.normalizer.normalize("action", action)
        noise = torch.randn(x0.shape, device=x0.device)
        t = torch.randint(0, self.cfg.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.unet(xt, t, cond)
        target = noise if self.cfg.prediction_type == "epsilon" else x0
        err = F.mse_loss(pred, target, reduction="none")
        if "action_is_pad" in batch:
            valid = (~self._tensor(batch["action_is_pad"]).bool()).unsqueeze(-1).float()
            return (err * valid).sum() / (valid.sum() * self.action_dim).clamp_min(1.0)
        return err.mean()

    @torch.no_grad()
    def predict_chunk(
        self,
        obs_window: Mapping[str, Any],
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        init_noise: torch.Tensor | None = None,
        scheduler: str | None = None,
    ) -> torch.Tensor:
        """Raw observation window (B, To, ...) -> action chunk (B, Ha, A) in robot units.

        `init_noise` (B, Ha, A), in the normalised action space, fixes the starting sample x_T (DDIM is then
        deterministic); otherwise it is drawn from `generator` (or torch's global RNG). `scheduler` (ddim | ddpm)
        and `num_inference_steps` override the config. With `cfg.eta` > 0 (and the ddim scheduler) the chunk
        is the last element of the stochastic chain `sample_chain` draws from `generator`: the deployed sampler.
        """
        cond = self.encode_obs(obs_window)
        if self.cfg.eta > 0 and (scheduler or self.cfg.inference_scheduler) == "ddim":
            c = self.cfg
            chain, _ = self.sample_chain(cond, num_inference_steps, c.eta, c.std_min, c.std_max, generator, init_noise)
            return self.normalizer.unnormalize("action", chain[:, -1])
        b = cond.shape[0]
        shape = (b, self.cfg.action_horizon, self.action_dim)
        if init_noise is not None:
            x = init_noise.to(device=cond.device, dtype=cond.dtype)
            if tuple(x.shape) != shape:
                raise ValueError(f"init_noise: expected {shape}, got {tuple(x.shape)}")
        else:
            gen_device = generator.device if generator is not None else cond.device
            x = torch.randn(shape, generator=generator, device=gen_device).to(cond.device)
        kind = scheduler or self.cfg.inference_scheduler
        steps = num_inference_steps or self.cfg.num_inference_steps or self.cfg.num_train_timesteps
        if kind == "ddpm" and num_inference_steps is None:
            steps = self.cfg.num_train_timesteps  # DDPM: the full chain unless asked otherwise
        return self.normalizer.unnormalize("action", self.denoise(x, cond, int(steps), kind, generator))

    def denoise(
        self, x: torch.Tensor, cond: torch.Tensor, steps: int | None = None, scheduler: str = "ddim", generator=None
    ) -> torch.Tensor:
        """x_T -> x_0 in the normalised action space with the scheduler's loop (DDIM: deterministic) over `steps`
        (None: the config's). The one definition of the chunk a deployed η = 0 policy acts on: distillation
        targets and RL-100's OPE use it."""
        if scheduler not in self.schedulers:
            raise ValueError(f"scheduler must be ddim or ddpm, got {scheduler!r}")
        sched = self.schedulers[scheduler]
        sched.set_timesteps(int(steps or self.cfg.num_inference_steps or self.cfg.num_train_timesteps), device=x.device)
        for t in sched.timesteps:
            eps = self.unet(x, t.expand(x.shape[0]), cond)
            x = sched.step(eps, t, x, generator=generator).prev_sample
        return x

    # ------------------------------------------------------------------- the denoising chain as a policy (RL)
    # RL over the chain (RL-100 §1.3, DPPO): each DDIM step x_k -> x_{k-1} is a Gaussian N(mu_k, sigma~_k^2 I)
    #   x0_hat  = (x_k - sqrt(1 - a_t) eps) / sqrt(a_t), clipped to [-1, 1] (clip_sample)
    #   sigma_k = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    #   mu_k    = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_k^2) eps
    #   sigma~_k = clip(sigma_k, std_min, std_max)         (the mean keeps the unclipped sigma_k, as RL-100)
    # so a chain's likelihood is a product of Gaussians and can be re-scored after the weights change. Everything
    # is in the normalised action space; `cond` is `encode_obs`'s output. predict_chunk (eta 0) is not touched.
    def chain_schedule(self, steps: int | None = None, eta: float = 1.0) -> list[tuple[int, float, float, float]]:
        """(t, a_t, a_prev, sigma) for each of the K DDIM steps, noisiest first (diffusers' DDIM timesteps)."""
        sched = self.schedulers["ddim"]
        steps = int(steps or self.cfg.num_inference_steps or self.cfg.num_train_timesteps)
        sched.set_timesteps(steps)
        out = []
        for t in sched.timesteps.tolist():
            prev = t - self.cfg.num_train_timesteps // steps
            a_t = float(sched.alphas_cumprod[t])
            a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
            sigma = eta * math.sqrt(max((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), 0.0))
            out.append((int(t), a_t, a_prev, sigma))
        return out

    def chain_step(
        self, x: torch.Tensor, cond: torch.Tensor, step: tuple[int, float, float, float], std_min: float,
        std_max: float | None,
    ) -> tuple[torch.Tensor, float]:  # fmt: skip
        """(mu_k, sigma~_k) of one denoising step from x_k (B, Ha, A); differentiable in the UNet's weights."""
        t, a_t, a_prev, sigma = step
        out = self.unet(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond)
        if self.cfg.prediction_type == "epsilon":
            eps, x0 = out, (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
        else:
            eps, x0 = (x - math.sqrt(a_t) * out) / math.sqrt(1 - a_t), out
        if self.cfg.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        std = min(max(sigma, std_min), std_max if std_max is not None else math.inf)
        return mean, std

    def sample_chain(
        self,
        cond: torch.Tensor,
        steps: int | None = None,
        eta: float = 1.0,
        std_min: float = 0.0067,
        std_max: float | None = 0.1,
        generator: torch.Generator | None = None,
        init_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A stochastic K-step DDIM chain at features `cond` (B, C): returns the chain x_K..x_0 (B, K+1, Ha, A) and
        the per-element log-probs of each step (B, K, Ha, A), both normalised; x_0 is the chunk."""
        b = cond.shape[0]
        shape = (b, self.cfg.action_horizon, self.action_dim)
        gen_device = generator.device if generator is not None else cond.device
        x = init_noise if init_noise is not None else torch.randn(shape, generator=generator, device=gen_device)
        x = x.to(cond.device, cond.dtype)
        chain, logps = [x], []
        with torch.no_grad():
            for step in self.chain_schedule(steps, eta):
                mean, std = self.chain_step(x, cond, step, std_min, std_max)
                noise = torch.randn(shape, generator=generator, device=gen_device).to(cond.device)
                x = mean + std * noise
                logps.append(torch.distributions.Normal(mean, std).log_prob(x))
                chain.append(x)
        return torch.stack(chain, 1), torch.stack(logps, 1)

    def chain_log_prob(
        self,
        cond: torch.Tensor,
        chain: torch.Tensor,
        steps: int | None = None,
        eta: float = 1.0,
        std_min: float = 0.0067,
        std_max: float | None = 0.1,
        step_index: int | None = None,
    ) -> torch.Tensor:
        """Per-element log-probs (B, K, Ha, A) of a stored chain under the current weights (with gradients), or of
        step `step_index` alone (B, Ha, A): one UNet pass per step re-scored."""
        schedule = self.chain_schedule(steps, eta)
        ks = range(len(schedule)) if step_index is None else [step_index]
        out = []
        for k in ks:
            mean, std = self.chain_step(chain[:, k], cond, schedule[k], std_min, std_max)
            out.append(torch.distributions.Normal(mean, std).log_prob(chain[:, k + 1]))
        return torch.stack(out, 1) if step_index is None else out[0]

    # --------------------------------------------------------------------------------------- Policy interface
    def reset(self) -> None:
        self._obs_queue.clear()
        self._action_queue.clear()

    def steps_left_in_chunk(self) -> int:
        """Actions of the current chunk still queued (0: the next `select_action` predicts a new chunk)."""
        return len(self._action_queue)

    def executed_rows(self) -> slice:
        """The chunk rows a robot executes: the chunk starts at the oldest observation of the window."""
        start = self.cfg.obs_horizon - 1
        return slice(start, start + self.cfg.n_action_steps)

    @torch.no_grad()
    def select_action(self, observation: Observation) -> np.ndarray:
        """Next action (A,): predicts a chunk from the last To observations whenever the queue is empty."""
        obs = {k: torch.as_tensor(np.array(_lookup(observation, k))) for k in self.obs_keys}
        if not self._obs_queue:  # episode start: the history is the first observation repeated
            self._obs_queue.extend([obs] * self.cfg.obs_horizon)
        else:
            self._obs_queue.append(obs)
        if not self._action_queue:
            window = {k: torch.stack([o[k] for o in self._obs_queue])[None] for k in self.obs_keys}
            was_training = self.training
            self.eval()
            try:
                chunk = self.predict_chunk(window, generator=self.generator)[0].cpu().numpy()
            finally:
                self.train(was_training)
            self._action_queue.extend(chunk[self.executed_rows()].astype(np.float32))
            self.num_predictions += 1
        return self._action_queue.popleft()

    def load_state_dict(self, state, strict: bool = True):  # accepts numpy arrays straight off the wire
        state = {k: torch.as_tensor(v) for k, v in state.items()}
        return nn.Module.load_state_dict(self, state, strict=strict)
