"""A simulated vision-language model behind a real OpenAI-compatible chat-completions HTTP server (loopback).

It serves one episode store recorded in sim. At start it computes every frame's ground-truth task progress from
the store's state columns (`PROGRESS[env_name]`, e.g. Lift: reach the cube, then lift it) and indexes the frames
by the hash of their pixels. A stage-1 request (two images) is answered by decoding the two images it was sent,
looking each up by content, and writing a short free-text analysis, as a model would; a stage-2 request (text
only) is answered 0 / 1 / -1 from that analysis text alone. It learns nothing a real API would not be sent.

Noise model (reference §2.7: VLMs err on similar pairs and often say "no difference"):
  * abstain: with probability `abstain`, or when the two progresses are equal, the analysis says it cannot see a
    difference (stage 2 then answers -1);
  * flip: otherwise the better image is swapped with probability
        p_flip(d) = min(0.5, noise * exp(-d / scale) / E[exp(-d / scale)]),   d = |progress_1 - progress_2|,
    the expectation over uniformly random pairs of the store, so `noise` is the mean flip rate of random pairs and
    close pairs are flipped more often than distant ones;
  * answers are deterministic per (seed, image pair), like a model at temperature 0.
An unknown image (not in the store) gets an unsure analysis. Faults for tests: the first `fail_first` requests get
HTTP 429 (Retry-After 0); a wrong API key gets 401; another model name gets 404. `latency_s` sleeps per request
to stand in for a model's inference time (throughput benchmarks).

    python -m robot_rl.sim.vlm_teacher STORE --port 8000 --noise 0.1 --abstain 0.3
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from robot_rl.data.episode_store import EpisodeStore
from robot_rl.reward.vlm_client import image_sha

log = logging.getLogger("robot_rl.sim.vlm_teacher")

LIFT_REACH_SCALE = 10.0  # reach term 1 - tanh(scale * gripper-to-cube distance), as robosuite's shaped reward
LIFT_HEIGHT = 0.04  # metres above the cube's resting height counted as fully lifted


def lift_progress(store: EpisodeStore) -> np.ndarray:
    """Per-step progress in [0, 1] of Lift: (reach + 2 * lift) / 3; reach from the gripper-to-cube distance, lift
    from the cube's height above where it rested at the episode's first step."""
    need = ("obs.cube_pos", "obs.gripper_to_cube_pos")
    missing = [k for k in need if k not in store.features]
    if missing:
        raise ValueError(f"{store.path}: Lift progress needs {missing} (a store recorded from robot=lift)")
    cube = store.array("obs.cube_pos").astype(np.float64)
    dist = np.linalg.norm(store.array("obs.gripper_to_cube_pos").astype(np.float64), axis=1)
    out = np.zeros(store.num_steps)
    for e in range(store.num_episodes):
        a, b = store.episode_bounds(e)
        reach = 1.0 - np.tanh(LIFT_REACH_SCALE * dist[a:b])
        lift = np.clip((cube[a:b, 2] - cube[a, 2]) / LIFT_HEIGHT, 0.0, 1.0)
        out[a:b] = (reach + 2.0 * lift) / 3.0
    return out


PROGRESS = {"Lift": lift_progress}


def store_progress(store: EpisodeStore) -> np.ndarray:
    """Ground-truth progress of every step of a sim store (by the robot config's env_name)."""
    env = ((store.meta.get("info") or {}).get("robot_config") or {}).get("env_name")
    if env not in PROGRESS:
        raise ValueError(f"{store.path}: no ground-truth progress for env {env!r}; known: {', '.join(PROGRESS)}")
    return PROGRESS[env](store)


def _stage_words(p: float) -> str:
    if p > 0.9:
        return "the gripper holding the cube well above the table"
    if p > 0.7:
        return "the gripper holding the cube, lifted a little off the table"
    if p > 0.5:
        return "the gripper closed around the cube, which is still on the table"
    if p > 0.3:
        return "the gripper close to the cube"
    return "the gripper away from the cube"


class Teacher:
    """The answers, independent of HTTP: `progress_of(image)`, `stage1(images, task)`, `stage2(text)`."""

    def __init__(self, store_path, *, noise: float, abstain: float, scale: float, seed: int, image_key: str | None):
        store = EpisodeStore.open(store_path)
        progress = store_progress(store)
        keys = [k for k, f in store.features.items() if f.is_image]
        key = image_key or (keys[0] if keys else None)
        if key is None or key not in store.features:
            raise ValueError(f"{store_path}: no image key {key!r}; image keys: {keys}")
        images = store.array(key)
        by_sha: dict[str, list[float]] = {}
        for img, p in zip(images, progress):
            by_sha.setdefault(image_sha(img), []).append(float(p))
        self.progress = {k: float(np.mean(v)) for k, v in by_sha.items()}
        self.noise, self.abstain, self.scale, self.seed = float(noise), float(abstain), float(scale), int(seed)
        rng = np.random.default_rng(seed)
        d = np.abs(
            progress[rng.integers(len(progress), size=20000)] - progress[rng.integers(len(progress), size=20000)]
        )
        self.mean_weight = float(np.mean(np.exp(-d / self.scale))) if len(progress) else 1.0

    def flip_probability(self, d: float) -> float:
        return min(0.5, self.noise * float(np.exp(-d / self.scale)) / max(self.mean_weight, 1e-9))

    def stage1(self, images: list[np.ndarray], task: str) -> str:
        shas = [image_sha(im) for im in images]
        p = [self.progress.get(s) for s in shas]
        if len(images) != 2 or None in p:
            return (
                "1. I cannot make out the scene in Image 1 clearly.\n2. I cannot make out Image 2 either.\n"
                "3. I am unsure whether there is any difference in terms of the goal."
            )
        rng = np.random.default_rng(int(hashlib.sha1(f"{self.seed}:{shas[0]}:{shas[1]}".encode()).hexdigest()[:15], 16))
        d = abs(p[0] - p[1])
        abstain = rng.random() < self.abstain or d < 1e-6
        seen = list(p)
        if rng.random() < self.flip_probability(d):
            seen = seen[::-1]  # a perception mistake: what it believes it sees is swapped
        lines = [
            f"1. Image 1 shows a robot arm with {_stage_words(seen[0])}.",
            f"2. Image 2 shows a robot arm with {_stage_words(seen[1])}.",
        ]
        if abstain:
            lines.append(f"3. The goal is {task}. I cannot see a clear difference between the images for this goal.")
        else:
            better = 1 if seen[0] > seen[1] else 2
            lines.append(f"3. The goal is {task}. Yes: Image {better} is closer to achieving the goal.")
        return "\n".join(lines)

    @staticmethod
    def stage2(text: str) -> str:
        m = re.search(r"Image ([12]) is closer to achieving the goal", text)
        return "-1" if m is None else str(int(m.group(1)) - 1)


def _decode(url: str) -> np.ndarray:
    from PIL import Image

    if not url.startswith("data:image/"):
        raise ValueError("only data: URLs are accepted (no fetching)")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


class TeacherServer:
    """ThreadingHTTPServer on 127.0.0.1 answering POST /v1/chat/completions; `with TeacherServer(...) as s:`
    gives `s.url` (the base URL a client takes). Counters: `requests`, `rejected`."""

    def __init__(
        self,
        store_path,
        *,
        model: str = "sim-vlm",
        api_key: str | None = None,
        noise: float = 0.0,
        abstain: float = 0.0,
        scale: float = 0.1,
        seed: int = 0,
        image_key: str | None = None,
        latency_s: float = 0.0,
        fail_first: int = 0,
        port: int = 0,
    ):
        self.teacher = Teacher(store_path, noise=noise, abstain=abstain, scale=scale, seed=seed, image_key=image_key)
        self.model, self.api_key, self.latency_s = model, api_key, float(latency_s)
        self.fail_first = int(fail_first)
        self.requests = self.rejected = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                code, obj, headers = server.answer(self.path, self.headers.get("Authorization"), raw)
                self._send(code, obj, headers)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread: threading.Thread | None = None

    def answer(self, path: str, auth: str | None, raw: bytes) -> tuple[int, dict, dict]:
        with self._lock:
            self.requests += 1
            n = self.requests
        if path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            return 404, {"error": {"message": f"no route {path}", "type": "not_found"}}, {}
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}}, {}
        if n <= self.fail_first:
            with self._lock:
                self.rejected += 1
            return 429, {"error": {"message": "rate limit reached", "type": "rate_limit"}}, {"Retry-After": "0"}
        try:
            req = json.loads(raw)
            if req.get("model") != self.model:
                return 404, {"error": {"message": f"model {req.get('model')!r} not found", "type": "not_found"}}, {}
            text = self._reply(req["messages"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return 400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}}, {}
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        prompt_chars = len(raw)
        usage = {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(text) // 4 + 1}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return (
            200,
            {
                "id": f"simvlm-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage,
            },
            {},
        )

    def _reply(self, messages: list[dict]) -> str:
        content = messages[-1]["content"]
        if isinstance(content, str):
            return self.teacher.stage2(content)
        images = [_decode(part["image_url"]["url"]) for part in content if part.get("type") == "image_url"]
        texts = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
        m = re.search(r"The goal is (.+?)\. Is there", texts)
        task = m.group(1) if m else "the task"
        if not images:
            return self.teacher.stage2(texts)
        return self.teacher.stage1(images, task)

    def start(self) -> TeacherServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="vlm-teacher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="simulated VLM preference teacher (OpenAI-compatible, loopback)")
    ap.add_argument("store", type=Path)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="sim-vlm")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--abstain", type=float, default=0.3)
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = TeacherServer(
        args.store,
        model=args.model,
        api_key=args.api_key,
        noise=args.noise,
        abstain=args.abstain,
        scale=args.scale,
        seed=args.seed,
        latency_s=args.latency,
        port=args.port,
    )
    log.info("serving %s as model %r at %s", args.store, args.model, server.url)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
