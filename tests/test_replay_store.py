"""The learner's on-disk replay: what was committed survives a crash, uncommitted rows are cut, nothing doubles."""

import json

import numpy as np
import pytest

from robot_rl.learner.replay import ReplayStore


def batch(start, n, obs_dim=5):
    seqs = np.arange(start, start + n, dtype=np.int64)
    return seqs, {"obs.x": np.tile(seqs[:, None], (1, obs_dim)).astype(np.float32),
                  "obs.img": np.full((n, 8, 8, 3), start % 255, np.uint8),
                  "expert_action": np.ones((n, 7), np.float32)}


def test_append_reopen_bit_exact(tmp_path):
    store = ReplayStore(tmp_path / "r.zarr")
    for start in range(0, 100, 10):
        assert store.append("robot0", *batch(start, 10)) == start + 9
    store.append("robot1", *batch(0, 4))
    again = ReplayStore(tmp_path / "r.zarr")
    assert again.size == 104
    assert again.next_expected == {"robot0": 100, "robot1": 4}
    np.testing.assert_array_equal(again.column("obs.x"), store.column("obs.x"))
    np.testing.assert_array_equal(again.column("obs.img"), store.column("obs.img"))
    seqs = again.seqs_by_sender()
    np.testing.assert_array_equal(seqs["robot0"], np.arange(100))
    np.testing.assert_array_equal(seqs["robot1"], np.arange(4))


def test_uncommitted_rows_are_cut_on_open(tmp_path):
    store = ReplayStore(tmp_path / "r.zarr")
    store.append("robot0", *batch(0, 10))
    committed = json.loads((tmp_path / "r.zarr" / "commit.json").read_text())
    store.append("robot0", *batch(10, 10))
    # simulate a crash after the data was written but before commit.json was replaced
    (tmp_path / "r.zarr" / "commit.json").write_text(json.dumps(committed))
    again = ReplayStore(tmp_path / "r.zarr")
    assert again.size == 10 and again.next_expected == {"robot0": 10}
    again.append("robot0", *batch(10, 10))  # the resend lands exactly once
    np.testing.assert_array_equal(ReplayStore(tmp_path / "r.zarr").seqs_by_sender()["robot0"], np.arange(20))


def test_mismatched_keys_are_refused(tmp_path):
    store = ReplayStore(tmp_path / "r.zarr")
    store.append("robot0", *batch(0, 4))
    seqs, arrays = batch(0, 4)
    del arrays["obs.img"]
    with pytest.raises(ValueError, match="same robot observation/action features"):
        store.append("robot1", seqs, arrays)
    assert store.size == 4


def test_sample_is_seeded(tmp_path):
    store = ReplayStore(tmp_path / "r.zarr")
    store.append("robot0", *batch(0, 50))
    a = store.sample(16, np.random.default_rng(0), ["obs.x"])
    b = store.sample(16, np.random.default_rng(0), ["obs.x"])
    np.testing.assert_array_equal(a["obs.x"], b["obs.x"])
