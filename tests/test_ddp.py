"""robot_rl.training.loop under DistributedDataParallel: 2 CPU processes (gloo, started as torchrun would: RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) train on the same global batch as one process, agree on every step's
loss, keep their own torch streams, write only from rank 0, and resume bit-exactly.

One spawn of two processes runs every phase (a process start with torch costs seconds on a loaded machine)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from robot_rl.training.loop import Hook, LoopConfig, TrainingLoop, seed_everything, to_device

from builders import loop_config

X = np.random.default_rng(0).normal(size=(512, 3)).astype(np.float32)
Y = np.tanh(X @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
STEPS, BATCH = 40, 32

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**over) -> LoopConfig:
    return loop_config(**{"steps": STEPS, "batch_size": BATCH, **over})


def regression(run_dir, dropout: float, cfg: LoopConfig | None = None) -> TrainingLoop:
    """A small MLP fitting y(x); with dropout its loss draws from torch's RNG (each rank's own stream)."""
    cfg = cfg or config()
    seed_everything(cfg.seed)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 1))

    def batches(rng):
        idx = rng.integers(0, len(X), cfg.batch_size)
        return to_device({"x": X[idx], "y": Y[idx]}, torch.device("cpu"))

    def step_fn(batch):
        err = net(batch["x"]) - batch["y"]
        return (err**2).mean(), {"abs_err": err.detach().abs().mean()}

    def val():  # rank 0 measures for the run; the others go on to the next step's collective and wait there
        net.eval()
        with torch.no_grad():
            mse = float(((net(torch.as_tensor(X)) - torch.as_tensor(Y)) ** 2).mean())
        net.train()
        return {"mse": mse}

    loop = TrainingLoop(
        run_dir, net, step_fn, batches, cfg, name="fit", weights_file="model.safetensors", hooks=[Hook("val", 10, val)]
    )
    return loop


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    result = {}
    # the same data as one process, no torch randomness: rank 1 writes nowhere (its own run dir stays absent)
    mine = f"{out}/exact" if rank == 0 else f"{out}/exact_rank1"
    loop = regression(mine, dropout=0.0)
    result["exact"] = loop.run()
    result["exact_losses"] = loop.losses
    result["val_steps"] = [step for step, _ in loop.history["val"]]
    result["initial_seed"] = torch.initial_seed()
    # per-rank dropout streams: straight, and killed after the step-20 checkpoint then resumed
    loop = regression(f"{out}/straight", dropout=0.2)
    loop.run()
    result["straight_losses"] = loop.losses
    first = regression(f"{out}/resumed", dropout=0.2)
    assert first.run(stop_after=20)["step"] == 20
    again = regression(f"{out}/resumed", dropout=0.2)
    again.resume()
    again.run()
    result["resumed_losses"] = again.losses
    result["raw_weight"] = again.model[0].weight.detach().sum().item()
    # a stop request (Ctrl-C / SIGTERM) reaching rank 1 alone: every rank finishes the same step and checkpoints
    stopping = regression(f"{out}/stopped", dropout=0.0)
    if rank == 1:
        stopping.after_step = lambda: stopping.request_stop() if stopping.step == 7 else None
    result["stopped"] = stopping.run()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from conftest import free_port

    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_train_what_one_process_trains(two_ranks, tmp_path):
    out, ranks = two_ranks
    one = regression(tmp_path / "one", dropout=0.0)
    s = one.run()
    two = ranks[0]["exact"]
    assert two["finished"] and two["processes"] == 2 and "processes" not in s
    # the same global batches: every step's loss (averaged over the ranks' halves) is the one-process loss
    np.testing.assert_allclose(ranks[0]["exact_losses"], one.losses, rtol=1e-5, atol=1e-6)
    assert ranks[0]["exact_losses"] == ranks[1]["exact_losses"]  # every rank holds the agreed loss
    assert ranks[0]["val_steps"] == [10, 20, 30, 40] and ranks[1]["val_steps"] == []  # hooks: rank 0 only
    assert two["val"]["mse"] == pytest.approx(s["val"]["mse"], rel=1e-4)
    for name in ("model.safetensors", "raw_model.safetensors"):
        a, b = (
            load_file(tmp_path / "one/checkpoints/step_40" / name),
            load_file(out / "exact/checkpoints/step_40" / name),
        )
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # only rank 0 writes: rank 1's run dir was never created
    assert (out / "exact" / "fit_summary.json").is_file() and not (out / "exact_rank1").exists()


def test_each_rank_has_its_own_stream_and_resume_is_exact(two_ranks):
    out, ranks = two_ranks
    assert ranks[0]["initial_seed"] != ranks[1]["initial_seed"]
    assert ranks[0]["straight_losses"] == ranks[1]["straight_losses"]
    assert ranks[0]["resumed_losses"] == ranks[0]["straight_losses"]  # killed at 20 and resumed: the same run
    assert ranks[0]["raw_weight"] == ranks[1]["raw_weight"]  # DDP keeps the ranks' weights identical
    state = json.loads((out / "resumed/checkpoints/step_40/trainer_state.json").read_text())
    assert len(state["rng"]["ranks"]["torch"]) == 2
    assert state["rng"]["ranks"]["torch"][0] != state["rng"]["ranks"]["torch"][1]


def test_a_stop_reaching_one_rank_stops_all_at_the_same_step(two_ranks):
    out, ranks = two_ranks
    # asked during step 8 on rank 1: the ranks learn it in step 9's collective, finish step 9 together and stop
    assert ranks[0]["stopped"]["step"] == ranks[1]["stopped"]["step"] == 9
    assert not ranks[0]["stopped"]["finished"]
    assert json.loads((out / "stopped/checkpoints/latest").read_text())["step"] == 9
