"""DiffusionPolicy, its normaliser and encoders: shapes, schedulers, action-queue semantics, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robot_rl.interfaces import Feature
from robot_rl.policies.diffusion import EMA, DiffusionConfig, DiffusionPolicy
from robot_rl.policies.encoders import RandomShift
from robot_rl.policies.normalizer import Normalizer

from builders import TINY_DIFFUSION, TINY_IMAGE

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = {**TINY_DIFFUSION, "obs_horizon": 2, "num_inference_steps": 5, "image": {**TINY_IMAGE, "random_shift_pad": 2}}


def features(image: bool) -> dict[str, Feature]:
    f = {
        "obs.state": Feature((4,)),
        "obs.vel": Feature((3,)),
        "action": Feature((2,), low=-np.ones(2), high=np.ones(2)),
    }
    if image:
        f["obs.cam_image"] = Feature((16, 16, 3), "uint8")
    return f


def make_policy(image: bool = False, **over) -> DiffusionPolicy:
    torch.manual_seed(0)
    p = DiffusionPolicy.from_store_features(features(image), {**TINY, **over})
    rng = np.random.default_rng(0)
    p.fit_normalizer(
        {
            "state": rng.normal(size=(100, 4)),
            "vel": rng.normal(size=(100, 3)),
            "action": rng.uniform(-0.5, 2.0, size=(100, 2)),
        }
    )
    return p


def batch(b: int, image: bool, rng=None) -> dict[str, np.ndarray]:
    rng = rng or np.random.default_rng(1)
    out = {
        "obs.state": rng.normal(size=(b, 2, 4)).astype(np.float32),
        "obs.vel": rng.normal(size=(b, 2, 3)).astype(np.float32),
        "action": rng.uniform(-0.5, 2.0, size=(b, 8, 2)).astype(np.float32),
        "action_is_pad": np.zeros((b, 8), bool),
    }
    if image:
        out["obs.cam_image"] = rng.integers(0, 256, size=(b, 2, 16, 16, 3), dtype=np.uint8)
    return out


def test_normalizer_round_trip_and_state_dict():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(500, 3))
    x[:, 2] = 7.0  # a constant entry must not blow up
    n = Normalizer({"a": ("minmax", (3,)), "b": ("meanstd", (3,)), "img": ("image", ())}).fit({"a": x, "b": x})
    xt = torch.as_tensor(x, dtype=torch.float32)
    ya = n.normalize("a", xt)
    assert torch.allclose(ya[:, :2].amin(0), torch.full((2,), -1.0), atol=1e-5)
    assert torch.allclose(ya[:, :2].amax(0), torch.ones(2), atol=1e-5)
    assert torch.allclose(ya[:, 2], torch.zeros(500))
    yb = n.normalize("b", xt)
    assert torch.allclose(yb[:, :2].mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(yb[:, :2].std(0, correction=0), torch.ones(2), atol=1e-3)
    for k in ("a", "b"):
        assert torch.allclose(n.unnormalize(k, n.normalize(k, xt)), xt, atol=1e-4)
    img = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    yi = n.normalize("img", img)
    assert yi.shape == (2, 3, 5, 6) and yi.min() >= -1 and yi.max() <= 1
    assert torch.allclose(n.unnormalize("img", yi), img.float(), atol=1e-3)
    # the statistics are buffers: they survive a state_dict round trip into a fresh module
    sd = n.state_dict()
    assert any(k.startswith("a__") for k in sd)
    m = Normalizer({"a": ("minmax", (3,)), "b": ("meanstd", (3,)), "img": ("image", ())})
    m.load_state_dict(sd)
    assert torch.equal(m.normalize("a", xt), ya)


@pytest.mark.parametrize("image", [False, True])
def test_shapes_loss_and_chunk(image):
    p = make_policy(image)
    assert p.obs_keys == (["state", "vel", "cam_image"] if image else ["state", "vel"])  # default: low-dim + cams
    b = batch(3, image)
    loss = p.compute_loss(b)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(q.grad is not None for q in p.unet.parameters())
    if image:
        assert p.obs_encoder.image_encoders["cam_image"].proj[0].weight.grad is not None
    p.eval()
    chunk = p.predict_chunk({k: v for k, v in b.items() if k.startswith("obs.")})
    assert chunk.shape == (3, 8, 2)
    # clip_sample keeps the normalised chunk in [-1, 1] -> the unnormalised one in the data's action range
    assert chunk.min() >= -0.5 - 1e-4 and chunk.max() <= 2.0 + 1e-4
    # plain robot keys work as well as store keys
    plain = {k[4:]: torch.as_tensor(v) for k, v in b.items() if k.startswith("obs.")}
    noise = torch.randn(3, 8, 2)
    assert torch.allclose(
        p.predict_chunk(plain, init_noise=noise),
        p.predict_chunk({k: v for k, v in b.items() if k.startswith("obs.")}, init_noise=noise),
    )


def test_padded_actions_do_not_count():
    p = make_policy()
    b = batch(4, False)
    b["action_is_pad"][:, 5:] = True
    torch.manual_seed(3)
    l1 = p.compute_loss(b)
    orig = p.unet.forward

    def wrong_on_padded_rows(x, t, cond):
        out = orig(x, t, cond).clone()
        out[:, 5:] += 100.0  # errors on padded rows must not count
        return out

    p.unet.forward = wrong_on_padded_rows
    torch.manual_seed(3)
    assert torch.allclose(p.compute_loss(b), l1)
    b["action_is_pad"][:] = False
    torch.manual_seed(3)
    assert p.compute_loss(b) > 1000


def test_ddim_and_ddpm():
    p = make_policy().eval()
    obs = {k: v for k, v in batch(2, False).items() if k.startswith("obs.")}
    noise = torch.randn(2, 8, 2)
    a = p.predict_chunk(obs, init_noise=noise, scheduler="ddim")
    assert torch.equal(a, p.predict_chunk(obs, init_noise=noise, scheduler="ddim"))  # eta 0: deterministic
    assert not torch.equal(a, p.predict_chunk(obs, init_noise=noise, scheduler="ddim", num_inference_steps=2))
    d1 = p.predict_chunk(obs, generator=torch.Generator().manual_seed(5), scheduler="ddpm")
    d2 = p.predict_chunk(obs, generator=torch.Generator().manual_seed(5), scheduler="ddpm")
    assert d1.shape == (2, 8, 2) and torch.equal(d1, d2)
    assert len(p.schedulers["ddpm"].timesteps) == 100  # DDPM runs the full train chain by default
    assert len(p.schedulers["ddim"].timesteps) == 2
    p2 = make_policy(inference_scheduler="ddpm").eval()
    p2.load_state_dict(p.state_dict())
    assert torch.equal(p2.predict_chunk(obs, generator=torch.Generator().manual_seed(5)), d1)


def test_select_action_queue_and_reset():
    p = make_policy().eval()
    rng = np.random.default_rng(2)
    obs_seq = [
        {"state": rng.normal(size=4).astype(np.float32), "vel": rng.normal(size=3).astype(np.float32)} for _ in range(9)
    ]
    p.generator = torch.Generator().manual_seed(11)
    acts = [p.select_action(o) for o in obs_seq]
    assert all(a.shape == (2,) and a.dtype == np.float32 for a in acts)
    assert p.num_predictions == 3  # steps 0, 4, 8 with n_action_steps=4
    # the first chunk saw obs 0 twice (history padded with the first observation) and executes rows 1..4
    window = {k: torch.as_tensor(np.stack([obs_seq[0][k]] * 2))[None] for k in ("state", "vel")}
    chunk = p.predict_chunk(window, generator=torch.Generator().manual_seed(11))[0].numpy()
    np.testing.assert_allclose(np.stack(acts[:4]), chunk[1:5], rtol=1e-5, atol=1e-6)
    # the second chunk is predicted at step 4 from observations 3 and 4
    assert [o["state"][0] for o in p._obs_queue][-1] == obs_seq[8]["state"][0]
    p.reset()
    assert not p._obs_queue and not p._action_queue
    p.select_action(obs_seq[0])
    assert p.num_predictions == 4 and len(p._action_queue) == 3


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        DiffusionConfig.from_dict({"action_horizon": 10, "down_dims": [8, 16, 32]})
    with pytest.raises(ValueError, match="must not exceed"):
        DiffusionConfig.from_dict({"action_horizon": 8, "down_dims": [8, 16], "n_action_steps": 8})
    with pytest.raises(ValueError, match="unknown"):
        DiffusionConfig.from_dict({"down_dim": [8]})
    with pytest.raises(ValueError, match="obs_keys"):
        DiffusionPolicy.from_store_features(features(False), {**TINY, "obs_keys": ["nope"]})
    p = DiffusionPolicy.from_store_features(features(True), {**TINY, "obs_keys": ["obs.cam_image"]})
    assert p.obs_keys == ["cam_image"]


def test_random_shift_only_in_training():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    shift = RandomShift(pad=3)
    shift.eval()
    assert torch.equal(shift(x), x)
    shift.train()
    y = shift(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    # every output is an exact integer-offset crop of the replicate-padded input
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3), mode="replicate")
    for i in range(6):
        assert any(
            torch.allclose(y[i], padded[i, :, dy : dy + 16, dx : dx + 16], atol=1e-5)
            for dy in range(7)
            for dx in range(7)
        )
    # in the policy: the training loss sees shifted images, predictions (eval) do not
    p = make_policy(image=True)
    b = batch(2, True)
    obs = {k: v for k, v in b.items() if k.startswith("obs.")}
    p.train()
    torch.manual_seed(1)
    c1 = p.encode_obs(obs)
    torch.manual_seed(2)
    c2 = p.encode_obs(obs)
    assert not torch.allclose(c1, c2)
    p.eval()
    assert torch.equal(p.encode_obs(obs), p.encode_obs(obs))


def test_ema_schedule_and_update():
    lin = torch.nn.Linear(3, 3)
    ema = EMA(lin, power=0.75, max_decay=0.9999)
    assert ema.get_decay(0) == 0.0
    assert 0.99 < ema.get_decay(1000) < 0.9999 and ema.get_decay(10**9) == 0.9999
    ema.update(lin)  # decay 0: a copy
    assert torch.equal(ema.model.weight, lin.weight)
    with torch.no_grad():
        lin.weight.add_(1.0)
    d = ema.update(lin)
    expected = d * (lin.weight - 1.0) + (1 - d) * lin.weight
    assert torch.allclose(ema.model.weight, expected)
    assert EMA(lin, decay=0.9).get_decay(0) == 0.9
