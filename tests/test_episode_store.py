"""Episode store: round trips, editing, crash safety (real SIGKILL of a writing process), full disk, sampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from robot_rl.data.episode_store import EpisodeStore, StoreError
from robot_rl.data.sequence import SequenceSampler
from robot_rl.data.tool import main as dataset_main
from robot_rl.interfaces import Feature

FEATS = {
    "obs.img": Feature((16, 16, 3), "uint8"),
    "obs.x": Feature((5,)),
    "action": Feature((3,), names=("a", "b", "c")),
    "success": Feature((), "bool"),
    "timestamp": Feature((), "float64"),
}


def frames_for(episode: int, length: int) -> list[dict]:
    """Deterministic frames of one episode, so a crashed store can be checked against a regenerated copy."""
    rng = np.random.default_rng(1000 + episode)
    return [
        {
            "obs.img": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "obs.x": rng.normal(size=5).astype(np.float32),
            "action": rng.normal(size=3).astype(np.float32),
            "success": np.bool_(t == length - 1),
            "timestamp": np.float64(t * 0.05 + rng.random() * 1e-3),
        }
        for t in range(length)
    ]


def length_of(episode: int) -> int:
    return 5 + (episode * 7) % 23  # episodes straddle chunk boundaries in different ways


def write_episodes(store: EpisodeStore, first: int, count: int) -> None:
    w = store.writer()
    for e in range(first, first + count):
        w.begin({"task": "t", "seed": e})
        for f in frames_for(e, length_of(e)):
            w.add(f)
        w.save({"success": True})


def assert_episode(store: EpisodeStore, index: int, episode: int) -> None:
    got = store.episode(index)
    want = frames_for(episode, length_of(episode))
    for k in FEATS:
        np.testing.assert_array_equal(got[k], np.stack([f[k] for f in want]), err_msg=k)


def test_round_trip_and_metadata(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", FEATS, fps=20, chunk_steps=8)
    write_episodes(store, 0, 4)
    store.close()
    r = EpisodeStore.open(tmp_path / "s")
    assert r.num_episodes == 4 and r.num_steps == sum(length_of(e) for e in range(4))
    for e in range(4):
        assert_episode(r, e, e)
        assert r.episodes[e]["seed"] == e and r.episodes[e]["length"] == length_of(e)
    assert r.features["action"].names == ("a", "b", "c")
    with pytest.raises(StoreError, match="read-only"):
        r.writer()


def test_discard_rerecord_and_bad_frames(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", FEATS, fps=20, chunk_steps=8)
    w = store.writer()
    w.begin({"seed": 0})
    for f in frames_for(99, 20):  # spans two flushed chunks, then thrown away
        w.add(f)
    w.discard()
    write_episodes(store, 0, 1)
    with pytest.raises(ValueError, match="shape"):
        w.add({**frames_for(1, 1)[0], "obs.x": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="missing"):
        w.add({k: v for k, v in frames_for(1, 1)[0].items() if k != "action"})
    w.discard()
    assert store.num_episodes == 1
    assert_episode(store, 0, 0)


def test_delete_keep_and_bad_index_changes_nothing(tmp_path, capsys):
    store = EpisodeStore.create(tmp_path / "s", FEATS, fps=20, chunk_steps=8)
    write_episodes(store, 0, 5)
    store.close()
    before = (tmp_path / "s" / "commit.json").read_text()
    assert dataset_main(["delete", str(tmp_path / "s"), "1,7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert (tmp_path / "s" / "commit.json").read_text() == before
    assert dataset_main(["delete", str(tmp_path / "s"), "1-2"]) == 0
    s = EpisodeStore.open(tmp_path / "s")
    assert s.num_episodes == 3 and [m["seed"] for m in s.episodes] == [0, 3, 4]
    for i, e in enumerate([0, 3, 4]):
        assert_episode(s, i, e)
    assert dataset_main(["keep", str(tmp_path / "s"), "--min-length", str(length_of(3) + 1)]) == 0
    s = EpisodeStore.open(tmp_path / "s")
    assert [m["seed"] for m in s.episodes] == [e for e in (0, 3, 4) if length_of(e) > length_of(3)]
    assert dataset_main(["list", str(tmp_path / "s")]) == 0
    assert "episodes" in capsys.readouterr().out


def test_stats_and_sampler_windows(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", FEATS, fps=20, chunk_steps=8)
    write_episodes(store, 0, 3)
    st = store.stats(["obs.x", "obs.img"])
    assert len(st["obs.x"]["mean"]) == 5 and len(st["obs.img"]["mean"]) == 3
    s = SequenceSampler.from_store(store, ["obs.x", "obs.img"], obs_horizon=2, action_horizon=4)
    start1 = int(store.episode_ends[0])
    b = s.get(np.array([start1, start1 + 2, start1 - 1]))
    x, a = store.array("obs.x"), store.array("action")
    # first step of episode 1: the missing past observation repeats the first one
    np.testing.assert_array_equal(b["obs.x"][0], x[[start1, start1]])
    np.testing.assert_array_equal(b["obs.x"][1], x[[start1 + 1, start1 + 2]])
    np.testing.assert_array_equal(b["action"][1], a[start1 + 1 : start1 + 5])
    # last step of episode 0: actions past the end repeat the last one and are marked as padding
    np.testing.assert_array_equal(b["action"][2], a[[start1 - 2, start1 - 1, start1 - 1, start1 - 1]])
    assert b["action_is_pad"][2].tolist() == [False, False, True, True]
    assert b["obs.img"].shape == (3, 2, 16, 16, 3) and b["obs.img"].dtype == np.uint8
    batch = s.sample(64, np.random.default_rng(0))
    assert batch["action"].shape == (64, 4, 3)


_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {tests!r})
    from test_episode_store import FEATS, frames_for, length_of
    from robot_rl.data.episode_store import EpisodeStore
    path, first = sys.argv[1], int(sys.argv[2])
    store = EpisodeStore.create(path, FEATS, 20, chunk_steps=8) if first == 0 else EpisodeStore.open(path, "a")
    if store.pending is not None:
        store.drop_pending()
    w = store.writer()
    e = store.num_episodes
    while True:
        w.begin({{"seed": e}})
        for f in frames_for(e, length_of(e)):
            w.add(f)
            time.sleep(0.002)
        w.save({{"success": True}})
        print(e, flush=True)
        e += 1
""")


def test_sigkill_mid_episode_keeps_completed_episodes_bit_exact(tmp_path):
    path = tmp_path / "s"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=str(Path(__file__).parent)))
    rng = np.random.default_rng(0)
    for attempt in range(3):  # kill, resume, kill again: every kill lands at a different point
        first = 0 if attempt == 0 else 1
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(first)], stdout=subprocess.PIPE, text=True)
        for _ in range(2 + attempt):
            assert proc.stdout.readline(), "writer died"
        time.sleep(float(rng.uniform(0.0, 0.05)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = EpisodeStore.open(path, "a")
        assert store.num_episodes >= 2 + attempt
        for e in range(store.num_episodes):  # episode index == its seed: nothing lost, nothing reordered
            assert_episode(store, e, e)
        if attempt == 2 and store.pending is not None:  # the partial episode is recoverable
            n_pending = store.pending["flushed"] - store.pending["start"]
            index = store.recover_pending()
            got = store.episode(index)
            want = frames_for(index, length_of(index))[:n_pending]
            np.testing.assert_array_equal(got["obs.x"], np.stack([f["obs.x"] for f in want]))
            assert store.episodes[index]["partial"] is True
        store.close()


@pytest.fixture
def tiny_disk(tmpfs):
    return tmpfs("600k")


def test_full_disk_clear_error_and_earlier_episodes_intact(tiny_disk):
    big = {**FEATS, "obs.img": Feature((64, 64, 3), "uint8")}
    store = EpisodeStore.create(tiny_disk / "s", big, fps=20, chunk_steps=8)
    w = store.writer()
    rng = np.random.default_rng(0)
    saved: list[list[dict]] = []
    with pytest.raises(StoreError, match="episode in progress was discarded"):
        for e in range(100):
            w.begin({"seed": e})
            frames = [
                {**f, "obs.img": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)} for f in frames_for(e, 20)
            ]  # incompressible: the disk fills within a few episodes
            for f in frames:
                w.add(f)
            w.save()
            saved.append(frames)
    assert saved, "the disk filled before the first episode: make the tmpfs bigger"
    store.close()
    r = EpisodeStore.open(tiny_disk / "s")
    assert r.num_episodes == len(saved)
    for i, frames in enumerate(saved):
        got = r.episode(i)
        for k in big:
            np.testing.assert_array_equal(got[k], np.stack([f[k] for f in frames]))


def test_create_refuses_existing_and_open_explains(tmp_path):
    store = EpisodeStore.create(tmp_path / "s", FEATS, fps=20)
    store.close()
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(tmp_path / "s", FEATS, fps=20)
    with pytest.raises(StoreError, match="not an episode store"):
        EpisodeStore.open(tmp_path)
    commit = json.loads((tmp_path / "s" / "commit.json").read_text())
    commit["num_steps"] = 10**6
    (tmp_path / "s" / "commit.json").write_text(json.dumps(commit))
    with pytest.raises(StoreError, match="damaged"):
        EpisodeStore.open(tmp_path / "s")
    assert not os.path.exists(tmp_path / "s" / "pending.json")
