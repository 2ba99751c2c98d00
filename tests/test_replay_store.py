"""The learner's on-disk replay: what was committed survives a crash, uncommitted rows are cut, nothing doubles."""

import json

import numpy as np
import pytest

from robot_rl.learner.replay_buffer import ReplayBuffer


def batch(start, n, obs_dim=5):
    seqs = np.arange(start, start + n, dtype=np.int64)
    return seqs, {
        "obs.x": np.tile(seqs[:, None], (1, obs_dim)).astype(np.float32),
        "obs.img": np.full((n, 8, 8, 3), start % 255, np.uint8),
        "expert_action": np.ones((n, 7), np.float32),
    }


def test_append_reopen_bit_exact(tmp_path):
    store = ReplayBuffer(tmp_path / "r.zarr")
    for start in range(0, 100, 10):
        assert store.append("robot0", *batch(start, 10)) == start + 9
    store.append("robot1", *batch(0, 4))
    again = ReplayBuffer(tmp_path / "r.zarr")
    assert again.size == 104
    assert again.next_expected == {("robot0", None): 100, ("robot1", None): 4}
    np.testing.assert_array_equal(again.column("obs.x"), store.column("obs.x"))
    np.testing.assert_array_equal(again.column("obs.img"), store.column("obs.img"))
    seqs = again.seqs_by_sender()
    np.testing.assert_array_equal(seqs["robot0"], np.arange(100))
    np.testing.assert_array_equal(seqs["robot1"], np.arange(4))


def test_uncommitted_rows_are_cut_on_open(tmp_path):
    store = ReplayBuffer(tmp_path / "r.zarr")
    store.append("robot0", *batch(0, 10))
    committed = json.loads((tmp_path / "r.zarr" / "commit.json").read_text())
    store.append("robot0", *batch(10, 10))
    # simulate a crash after the data was written but before commit.json was replaced
    (tmp_path / "r.zarr" / "commit.json").write_text(json.dumps(committed))
    again = ReplayBuffer(tmp_path / "r.zarr")
    assert again.size == 10 and again.next_expected == {("robot0", None): 10}
    again.append("robot0", *batch(10, 10))  # the resend lands exactly once
    np.testing.assert_array_equal(ReplayBuffer(tmp_path / "r.zarr").seqs_by_sender()["robot0"], np.arange(20))


def test_mismatched_keys_are_refused(tmp_path):
    store = ReplayBuffer(tmp_path / "r.zarr")
    store.append("robot0", *batch(0, 4))
    seqs, arrays = batch(0, 4)
    del arrays["obs.img"]
    with pytest.raises(ValueError, match="same robot observation/action features"):
        store.append("robot1", seqs, arrays)
    assert store.size == 4


def test_streams_schema_and_write_behind(tmp_path):
    """Rows of each (sender, stream) are kept apart; memory first (extend), zarr in one append (flush); the
    schema is persisted and a batch with another row shape is refused without touching the columns on disk."""
    store = ReplayBuffer(tmp_path / "r.zarr")
    store.extend("robot0", *batch(0, 10), stream="a", lsn=0)
    store.extend("robot0", *batch(0, 5), stream="b", lsn=1)
    assert store.size == 15 and store.disk_rows == 0 and not (tmp_path / "r.zarr" / "commit.json").exists()
    assert store.flush() == 15 and store.disk_rows == 15 and store.disk_lsn == 2
    again = ReplayBuffer(tmp_path / "r.zarr")
    assert again.next_expected == {("robot0", "a"): 10, ("robot0", "b"): 5} and again.lsn == 2
    by_stream = again.seqs_by_stream()
    np.testing.assert_array_equal(by_stream[("robot0", "a")], np.arange(10))
    np.testing.assert_array_equal(by_stream[("robot0", "b")], np.arange(5))
    assert again.schema["obs.x"] == (np.dtype(np.float32).str, (5,))
    with pytest.raises(ValueError, match="shape"):
        again.append("robot1", *batch(0, 3, obs_dim=6))
    assert again.size == 15 and ReplayBuffer(tmp_path / "r.zarr").schema == again.schema
    # held-back rows still advance the stream: `end` says where it resumes
    again.extend("robot0", np.array([10, 12]), {k: v[[0, 2]] for k, v in batch(10, 3)[1].items()}, stream="a", end=13)
    again.flush()
    assert ReplayBuffer(tmp_path / "r.zarr").next_expected[("robot0", "a")] == 13


def test_sample_is_seeded(tmp_path):
    store = ReplayBuffer(tmp_path / "r.zarr")
    store.append("robot0", *batch(0, 50))
    a = store.sample(16, np.random.default_rng(0), ["obs.x"])
    b = store.sample(16, np.random.default_rng(0), ["obs.x"])
    np.testing.assert_array_equal(a["obs.x"], b["obs.x"])


def test_capacity_hint_allocates_up_front_and_growth_keeps_contents(tmp_path):
    store = ReplayBuffer(tmp_path / "r.zarr", preallocate_rows=30)
    store.append("robot0", *batch(0, 10))
    used, allocated = store.memory_bytes()
    row = sum(a[0].nbytes for a in batch(0, 1)[1].values()) + 8 + 4 + 4  # + _seq, _sender, _stream
    assert (used, allocated) == (10 * row, 30 * row)  # exactly the hint, not 1024 rows
    for start in range(10, 30, 10):
        store.append("robot0", *batch(start, 10))
    assert store.memory_bytes() == (30 * row, 30 * row)  # full, no growth yet
    before = {k: store.column(k).copy() for k in store.keys()}
    store.append("robot1", *batch(0, 45))  # past the hint: grows (doubling below 64k rows) to 120
    assert store.size == 75 and store.memory_bytes() == (75 * row, 120 * row)
    for k, v in before.items():  # the rows held before growing are unchanged, the new ones follow
        np.testing.assert_array_equal(store.column(k)[:30], v)
        np.testing.assert_array_equal(store.column(k)[30:], batch(0, 45)[1][k])
    seqs = store.seqs_by_sender()
    np.testing.assert_array_equal(seqs["robot0"], np.arange(30))
    np.testing.assert_array_equal(seqs["robot1"], np.arange(45))
    # reopening honours the hint too, and holds the same rows
    again = ReplayBuffer(tmp_path / "r.zarr", preallocate_rows=200)
    assert again.memory_bytes() == (75 * row, 200 * row)
    for k in store.keys():
        np.testing.assert_array_equal(again.column(k), store.column(k))
    assert ReplayBuffer(tmp_path / "r.zarr").memory_bytes()[1] == 1024 * row  # no hint: 1024 rows as before


def test_growth_doubles_up_to_64k_rows_then_steps_by_quarter():
    from robot_rl.learner.replay_buffer import next_capacity

    assert next_capacity(1024, 1025) == 2048
    assert next_capacity(1024, 65536) == 65536
    assert next_capacity(40_000, 40_001) == 65536  # doubling stops at 64k ...
    assert next_capacity(65536, 65537) == 81920  # ... then 1.25x
    assert next_capacity(1024, 100_000) == 102_400  # 100k transitions: 2.4 % spare instead of 31 % (131072)
    cap = 65536
    for _ in range(20):
        nxt = next_capacity(cap, cap + 1)
        assert cap < nxt <= cap * 1.25 + 1
        cap = nxt


def test_a_snapshot_keeps_its_rows_while_the_replay_grows(tmp_path):
    """What the learner hands an algorithm for one step: every column the same length, though rows arrive meanwhile
    (and the memory buffers are reallocated as they grow)."""
    store = ReplayBuffer(tmp_path / "r.zarr", preallocate_rows=16)
    store.extend("robot0", *batch(0, 10))
    view = store.snapshot()
    for start in range(10, 200, 10):  # past the preallocated rows: buffers replaced
        store.extend("robot0", *batch(start, 10))
    assert view.size == 10 and store.size == 200
    assert len(view.column("obs.x")) == len(view.column("expert_action")) == 10
    np.testing.assert_array_equal(view.column("obs.x")[:, 0], np.arange(10))
    assert view.keys() == store.keys()
    s = view.sample(64, np.random.default_rng(0), ["obs.x"])
    assert s["obs.x"].shape == (64, 5) and s["obs.x"].max() < 10
