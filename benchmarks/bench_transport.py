"""Transport benchmark: robot_rl TransitionSender/Receiver vs pickle over PUSH/PULL, two OS processes, one host.

    python benchmarks/bench_transport.py [--quick]

1. throughput of state-only transitions (obs 40 x f32, action 7 x f32, reward, done), acked, batched;
   baseline: pickle.dumps of the same batch (a list of transition dicts) over PUSH/PULL, no acks.
2. latency of image transitions (2 x 96x96x3 uint8 + state) at 30 Hz: p50/p99 end to end (monotonic stamp in
   the transition, compared on receipt) and lost count; baseline: one pickle.dumps per transition over PUSH/PULL.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle  # the baseline only
import socket
import statistics
import tempfile
import time

import numpy as np
import zmq

from robot_rl.transport import TransitionReceiver, TransitionSender

BATCH = 64


def state_transition(i: int) -> dict:
    return {
        "obs": np.full(40, i, np.float32),
        "action": np.zeros(7, np.float32),
        "reward": np.float32(0.0),
        "done": np.bool_(False),
        "t": np.float64(time.monotonic()),
    }


_IMG = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)


def image_transition(i: int) -> dict:
    return {
        "front": _IMG.copy(),
        "wrist": _IMG.copy(),
        "state": np.full(14, i, np.float32),
        "action": np.zeros(7, np.float32),
        "reward": np.float32(0.0),
        "done": np.bool_(False),
        "t": np.float64(time.monotonic()),
    }


# ------------------------------------------------------------------------------------------------ children
def _child(impl: str, mode: str, endpoint: str, n: int, hz: float, delay: float) -> None:
    make = state_transition if mode == "throughput" else image_transition
    period = 1.0 / hz if hz else 0.0
    if impl == "ours":
        tx = TransitionSender(endpoint, "bench", batch_size=BATCH, max_batch_delay_s=delay).start()
        t_next = time.monotonic()
        for i in range(n):
            tx.submit(make(i))
            if period:
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))
        left = tx.close(linger_s=30.0)
        os._exit(0 if left == 0 else 3)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 30000)
    sock.connect(endpoint)
    time.sleep(0.2)  # let PUSH connect so the first messages are not queued behind the handshake
    t_next = time.monotonic()
    if mode == "throughput":
        for i in range(0, n, BATCH):
            sock.send(pickle.dumps([make(j) for j in range(i, min(n, i + BATCH))]))
    else:
        for i in range(n):
            sock.send(pickle.dumps(make(i)))
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))
    sock.close()
    os._exit(0)


def _run(impl: str, mode: str, endpoint: str, n: int, hz: float = 0.0, delay: float = 0.0) -> dict:
    """Receiver in this process, sender in a spawned one. Returns rate / latency figures."""
    ctx = mp.get_context("spawn")
    if impl == "ours":
        rx = TransitionReceiver(endpoint)
    else:
        rx = zmq.Context.instance().socket(zmq.PULL)
        rx.setsockopt(zmq.LINGER, 0)
        rx.bind(endpoint)
    proc = ctx.Process(target=_child, args=(impl, mode, endpoint, n, hz, delay))
    proc.start()
    lat: list[np.ndarray] = []
    seen = 0
    t_first = t_last = None
    deadline = time.monotonic() + max(60.0, n / hz + 30 if hz else 60.0)
    while seen < n and time.monotonic() < deadline:
        if impl == "ours":
            batches = rx.poll(100)
            now = time.monotonic()
            for b in batches:
                stamps = b.arrays["t"]
                seen += len(b)
                rx.ack(b.sender_id, b.stream, int(b.seqs[-1]))
                lat.append(now - stamps)
            if not batches and not proc.is_alive():
                break
        else:
            if not rx.poll(100):
                if not proc.is_alive() and not rx.poll(500):
                    break
                continue
            obj = pickle.loads(rx.recv())
            now = time.monotonic()
            items = obj if isinstance(obj, list) else [obj]
            seen += len(items)
            lat.append(now - np.array([float(t["t"]) for t in items]))
        if lat and t_first is None:
            t_first = now - float(lat[0].max())  # stamp of the first transition received
        t_last = now
    if impl == "ours":  # let the sender see its last acks before it exits
        while proc.is_alive() and time.monotonic() < deadline:
            rx.poll(20)
    proc.join(30)
    rx.close()
    all_lat = np.concatenate(lat) if lat else np.zeros(0)
    return {
        "rate": seen / (t_last - t_first) if seen and t_last > t_first else 0.0,
        "p50_ms": float(np.percentile(all_lat, 50) * 1e3) if len(all_lat) else float("nan"),
        "p99_ms": float(np.percentile(all_lat, 99) * 1e3) if len(all_lat) else float("nan"),
        "lost": n - seen,
    }


def _free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller runs (< 30 s)")
    args = ap.parse_args()
    n_tp, repeats, lat_s = (20_000, 1, 2.0) if args.quick else (100_000, 3, 10.0)
    tmp = tempfile.mkdtemp(prefix="bench_transport_")
    counter = iter(range(10**6))

    def endpoint(kind: str) -> str:
        return f"ipc://{tmp}/b{next(counter)}.ipc" if kind == "ipc" else _free_tcp()

    rows = []
    print(
        f"state-only throughput: {n_tp} transitions, batch {BATCH}, median of {repeats}; "
        f"image latency: 2x96x96x3 uint8 at 30 Hz for {lat_s:.0f} s\n",
        flush=True,
    )
    for kind in ("ipc", "tcp"):
        ours = statistics.median(
            _run("ours", "throughput", endpoint(kind), n_tp, delay=0.005)["rate"] for _ in range(repeats)
        )
        base = statistics.median(_run("pickle", "throughput", endpoint(kind), n_tp)["rate"] for _ in range(repeats))
        rows.append((f"throughput {kind} (transitions/s)", f"{ours:,.0f}", f"{base:,.0f}", f"{ours / base:.2f}"))
        print(*rows[-1], sep=" | ", flush=True)

    n_img = int(30 * lat_s)
    for kind in ("ipc", "tcp"):
        ours = _run("ours", "latency", endpoint(kind), n_img, hz=30.0, delay=0.0)
        base = _run("pickle", "latency", endpoint(kind), n_img, hz=30.0)
        dflt = _run("ours", "latency", endpoint(kind), n_img, hz=30.0, delay=0.05)
        for key, label in (("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")):
            rows.append(
                (f"image 30 Hz {kind} {label}", f"{ours[key]:.2f}", f"{base[key]:.2f}", f"{ours[key] / base[key]:.2f}")
            )
            print(*rows[-1], sep=" | ", flush=True)
        rows.append((f"image 30 Hz {kind} lost / {n_img}", str(ours["lost"]), str(base["lost"]), ""))
        rows.append(
            ("  (ours, max_batch_delay_s=0.05) p50/p99 ms", f"{dflt['p50_ms']:.1f}/{dflt['p99_ms']:.1f}", "", "")
        )
        print(*rows[-2], sep=" | ", flush=True)

    w = [max(len(r[i]) for r in rows + [("metric", "ours", "pickle", "ours/pickle")]) for i in range(4)]
    line = "+".join("-" * (x + 2) for x in w)
    print("\n" + " | ".join(h.ljust(x) for h, x in zip(("metric", "ours", "pickle", "ours/pickle"), w)))
    print(line)
    for r in rows:
        print(" | ".join(c.ljust(x) for c, x in zip(r, w)))
    print("\ntargets: throughput >= 50k/s; image p99 < 5 ms with zero loss (ours with max_batch_delay_s=0)")


if __name__ == "__main__":
    main()
