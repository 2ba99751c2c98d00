"""`predict_chunk` in a child process, so a diffusion sampling loop never holds the control process's GIL.

Why (robot_rl/policies/chunking.py has the numbers): a chunk policy's inference thread hands the GIL back and forth
with a Python robot driver many times a tick. `ProcessPredictor` runs the policy in a fresh interpreter behind the
same `predict_chunk` interface, so `AsyncChunkRunner` takes it like any chunk policy; requests and chunks travel
as a JSON header plus raw array bytes over two pipes (no pickle).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import traceback
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import torch

from robot_rl.policies.chunking import policy_attr, default_torch_threads


def encode_message(header: dict, arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """4-byte header length, a JSON header naming each array's dtype and shape, then the raw array bytes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    head = json.dumps({**header, "arrays": [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]}).encode()
    return b"".join([len(head).to_bytes(4, "little"), head, *(a.tobytes() for a in arrays.values())])


def decode_message(buf: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    n = int.from_bytes(buf[:4], "little")
    header = json.loads(buf[4 : 4 + n])
    arrays, offset = {}, 4 + n
    for key, dtype, shape in header.pop("arrays"):
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arrays[key] = np.frombuffer(
            buf, dtype=dt, count=size // dt.itemsize if dt.itemsize else 0, offset=offset
        ).reshape(shape)
        offset += size
    return header, arrays


def _predictor_main(fd_in: int, fd_out: int, loader: str, kwargs: dict, torch_threads: int, nice: int) -> None:
    """Child process: load the policy with `loader` ("module:function"), then answer predict requests."""
    from multiprocessing.connection import Connection

    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us (or EOF does)
    conn_in, conn_out = Connection(fd_in, writable=False), Connection(fd_out, readable=False)
    try:
        if nice:
            os.nice(int(nice))
        torch.set_num_threads(int(torch_threads))
        module, fn = loader.split(":")
        policy = getattr(importlib.import_module(module), fn)(**kwargs)
        conn_out.send_bytes(
            encode_message(
                {
                    "op": "ready",
                    "obs_keys": list(policy.obs_keys),
                    "obs_horizon": int(policy_attr(policy, "obs_horizon", 1)),
                    "action_horizon": int(policy_attr(policy, "action_horizon", 1)),
                    "n_action_steps": int(policy_attr(policy, "n_action_steps", 1)),
                    "device": str(getattr(policy, "device", "cpu")),
                }
            )
        )
    except BaseException:  # noqa: BLE001 - sent to the parent, which raises it
        conn_out.send_bytes(encode_message({"op": "error", "traceback": traceback.format_exc()}))
        return
    device = getattr(policy, "device", torch.device("cpu"))
    generator = None
    while True:
        try:
            header, arrays = decode_message(conn_in.recv_bytes())
        except (EOFError, OSError):
            return  # the parent went away
        if header["op"] == "stop":
            return
        try:
            if header.get("seed") is not None:
                generator = torch.Generator(device=device).manual_seed(int(header["seed"]))
            kw = {"num_inference_steps": header["num_inference_steps"]} if header.get("num_inference_steps") else {}
            batch = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
            with torch.inference_mode():
                chunk = policy.predict_chunk(batch, generator=generator, **kw)
            conn_out.send_bytes(encode_message({"op": "chunk"}, {"chunk": chunk.detach().cpu().numpy()}))
        except BaseException:  # noqa: BLE001 - reported to the parent
            conn_out.send_bytes(encode_message({"op": "error", "traceback": traceback.format_exc()}))


class ProcessPredictor:
    """`predict_chunk` in a spawned child process (no GIL shared with the control loop), duck-typing a chunk
    policy for AsyncChunkRunner. `loader` ("module:function") is called in the child with `kwargs` and returns
    the policy. `nice` lowers the child's CPU priority (the loop's process keeps the CPU when it is short)."""

    def __init__(
        self,
        loader: str,
        kwargs: dict | None = None,
        *,
        torch_threads: int | None = None,
        nice: int = 0,
        start_timeout_s: float = 180.0,
    ):
        import subprocess
        from multiprocessing.connection import Connection

        # a fresh interpreter (`python -m robot_rl.policies.inference_process`): no fork of a process holding torch threads
        # or a GL context, no re-import of the caller's __main__; config as JSON, arrays as raw bytes on two pipes
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        spec = {
            "fd_in": req_r,
            "fd_out": resp_w,
            "loader": loader,
            "kwargs": dict(kwargs or {}),
            "torch_threads": int(torch_threads or default_torch_threads()),
            "nice": int(nice),
        }
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "robot_rl.policies.inference_process", "--worker", json.dumps(spec)],
                pass_fds=(req_r, resp_w),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(req_r)
            os.close(resp_w)
        self._conn_out, self._conn_in = Connection(req_w, readable=False), Connection(resp_r, writable=False)
        self._lock = threading.Lock()
        self._seed: int | None = None
        self.pid = self._proc.pid
        if not self._conn_in.poll(start_timeout_s):
            self.close()
            raise RuntimeError(f"the inference process did not start within {start_timeout_s:.0f} s")
        try:
            header, _ = decode_message(self._conn_in.recv_bytes())
        except EOFError:
            self.close()
            raise RuntimeError(f"the inference process exited while starting (code {self._proc.poll()})") from None
        if header["op"] == "error":
            self.close()
            raise RuntimeError(f"the inference process could not load the policy:\n{header['traceback']}")
        self.obs_keys = header["obs_keys"]
        self.cfg = SimpleNamespace(
            obs_horizon=header["obs_horizon"],
            action_horizon=header["action_horizon"],
            n_action_steps=header["n_action_steps"],
        )
        self.device_name = header["device"]

    def set_seed(self, seed: int) -> None:
        self._seed = int(seed)  # sent with the next request

    def predict_chunk(self, batch: Mapping[str, Any], generator=None, num_inference_steps: int | None = None):
        arrays = {k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in batch.items()}
        with self._lock:
            seed, self._seed = self._seed, None
            try:
                self._conn_out.send_bytes(
                    encode_message({"op": "predict", "seed": seed, "num_inference_steps": num_inference_steps}, arrays)
                )
                header, out = decode_message(self._conn_in.recv_bytes())  # blocks without the GIL
            except (EOFError, BrokenPipeError):
                raise RuntimeError(
                    f"the inference process (pid {self.pid}) died (exit code {self._proc.poll()})"
                ) from None
        if header["op"] == "error":
            raise RuntimeError(f"inference process error:\n{header['traceback']}")
        return torch.from_numpy(np.array(out["chunk"]))

    def close(self, timeout: float = 5.0) -> None:
        import subprocess

        try:
            self._conn_out.send_bytes(encode_message({"op": "stop"}))
        except (OSError, ValueError):
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.terminate()
            self._proc.wait(timeout)
        for c in (self._conn_out, self._conn_in):
            c.close()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _predictor_main(**json.loads(sys.argv[2]))
