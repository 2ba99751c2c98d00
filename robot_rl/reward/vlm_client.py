"""Preference labels from a vision-language model (RL-VLM-F's two-stage prompt) over any OpenAI-compatible
chat-completions endpoint with image input (vLLM, Ollama, llama.cpp server, a hosted API, or sim/vlm_teacher.py).

    pairs = sample_pairs(images, episode_ends, n=2000, seed=0)          # across and within episodes
    client = ChatClient("http://127.0.0.1:8000/v1", model="qwen2.5-vl", api_key=os.environ.get(...))
    summary = label_pairs(client, images, pairs, index_info, task="to lift the cube", log=LabelLog(path))

One pair = two calls. Stage 1 shows both images and asks what each shows and whether they differ in achieving the
goal; stage 2 gives that analysis back as text and asks for one line: 0 (image 1 better), 1 (image 2 better) or
-1 (unsure / no difference). Anything else parses as -1 (reference §2.1, §2.2).

Every answered pair is one JSON line appended to the label log and fsynced before the next is written: raw texts,
parsed label, models, prompt version, latency, tokens, attempts. A crash or Ctrl-C loses no paid answer (at most
the line being written, which the reader skips); a rerun reads the log and asks only the pairs not in it.
Transient failures (HTTP 429, 5xx, timeouts, refused connections) are retried with exponential backoff (honouring
Retry-After); 401/403/404 stop at once with a message saying what to check.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("robot_rl.reward.vlm_client")

PROMPT_VERSION = "rlvlmf-two-stage-v1"
QUESTIONS = (
    "1. What is shown in Image 1?\n"
    "2. What is shown in Image 2?\n"
    "3. The goal is {task}. Is there any difference between Image 1 and Image 2 in terms of achieving the goal?"
)
STAGE2 = (
    "Based on the text below to the questions:\n{questions}\n{analysis}\n\n"
    "Is the goal better achieved in Image 1 or Image 2?\n"
    "Reply a single line of 0 if the goal is better achieved in Image 1, or 1 if it is better achieved in Image 2.\n"
    "Reply -1 if the text is unsure or there is no difference."
)
LABELS = (0, 1, -1)


# ------------------------------------------------------------------------------------------------- prompt


def png_data_url(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> a data: URL holding it as PNG (lossless, so a server can hash the pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stage1_messages(task: str, image1: np.ndarray, image2: np.ndarray) -> list[dict]:
    """The analysis request: both images interleaved with their names, then the three questions."""
    content = [
        {"type": "text", "text": "Consider the following two images:\nImage 1:"},
        {"type": "image_url", "image_url": {"url": png_data_url(image1)}},
        {"type": "text", "text": "Image 2:"},
        {"type": "image_url", "image_url": {"url": png_data_url(image2)}},
        {"type": "text", "text": QUESTIONS.format(task=task)},
    ]
    return [{"role": "user", "content": content}]


def stage2_messages(task: str, analysis: str) -> list[dict]:
    """The labelling request: text only, the stage-1 answer quoted under the same questions."""
    text = STAGE2.format(questions=QUESTIONS.format(task=task), analysis=analysis.strip())
    return [{"role": "user", "content": text}]


def parse_label(text: str) -> int:
    """RL-VLM-F's `int(res)` made tolerant of whitespace, a trailing period or a short preamble: the last line
    that is exactly 0, 1 or -1 wins; anything else is -1 (no preference)."""
    for line in reversed((text or "").strip().splitlines()):
        m = re.fullmatch(r"\s*\**\s*(-1|0|1)\s*\.?\s*\**\s*", line)
        if m:
            return int(m.group(1))
    return -1


def image_sha(image: np.ndarray) -> str:
    """Content hash of a frame's pixels (what the label log records and the simulated teacher looks up)."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- client


class VLMError(RuntimeError):
    """The endpoint cannot be used as configured (or kept failing); the message says what to check."""


@dataclass
class Answer:
    text: str
    usage: dict
    attempts: int
    latency_s: float


class ChatClient:
    """POST `<url>/chat/completions` with the standard library; retries what is transient, stops on what is not."""

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        backoff_max_s: float,
        max_tokens: int,
        temperature: float,
        seed: int = 0,
    ):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.backoff_max_s = float(backoff_s), float(backoff_max_s)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self._jitter = random.Random(seed)
        self.retries = 0  # transient failures retried so far (all threads)

    def complete(self, messages: list[dict], model: str | None = None) -> Answer:
        body = json.dumps(
            {
                "model": model or self.model,
                "messages": messages,
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        t0 = time.monotonic()
        for attempt in range(1, self.max_retries + 2):
            req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    data = json.loads(resp.read())
                text = data["choices"][0]["message"]["content"] or ""
                return Answer(text, dict(data.get("usage") or {}), attempt, time.monotonic() - t0)
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code in (401, 403):
                    raise VLMError(
                        f"{self.endpoint} refused the API key (HTTP {e.code}: {detail}); set the environment "
                        f"variable named by label.api_key_env to a valid key"
                    ) from None
                if e.code == 404:
                    raise VLMError(
                        f"{self.endpoint} answered 404 ({detail}): check label.url (the base URL ending in /v1) "
                        f"and label.model={model or self.model!r} (a model the server serves)"
                    ) from None
                if e.code != 429 and e.code < 500:
                    raise VLMError(f"{self.endpoint} rejected the request (HTTP {e.code}: {detail})") from None
                wait_s = _retry_after(e)
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                wait_s, reason = None, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, ValueError) as e:
                raise VLMError(f"{self.endpoint} answered something that is not a chat completion ({e})") from None
            if attempt > self.max_retries:
                raise VLMError(
                    f"{self.endpoint}: still failing after {self.max_retries} retries ({reason}); "
                    f"check the server, or raise label.max_retries / lower label.concurrency"
                )
            self.retries += 1
            backoff = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + self._jitter.random())
            time.sleep(wait_s if wait_s is not None else backoff)
        raise AssertionError("unreachable")


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str((body.get("error") or {}).get("message") or body)[:200]
    except (ValueError, AttributeError, OSError):
        return e.reason or ""


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return max(0.0, float(e.headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ pairs


def sample_pairs(
    images: np.ndarray,
    episode_ends: np.ndarray,
    n: int,
    seed: int,
    *,
    within_fraction: float,
    min_gap: int,
    min_pixel_diff: float,
    max_tries: int = 50,
) -> list[tuple[int, int]]:
    """`n` pairs of global step indices, the first `n` of one seeded sequence (a bigger `n` extends a smaller
    plan). A `within_fraction` of pairs come from one episode at least `min_gap` steps apart, the rest from two
    episodes; pairs whose mean absolute pixel difference is below `min_pixel_diff` (0..255) are skipped, as are
    repeats. Fewer than `n` only if the store cannot supply them."""
    ends = np.asarray(episode_ends, np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    lengths = ends - starts
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    misses = 0
    while len(out) < n and misses < max_tries * max(n, 1):
        within = len(ends) < 2 or rng.random() < within_fraction
        if within:
            e = int(rng.integers(len(ends)))
            if lengths[e] <= min_gap:
                misses += 1
                continue
            t1, t2 = rng.choice(int(lengths[e]), size=2, replace=False)
            if abs(int(t1) - int(t2)) < min_gap:
                misses += 1
                continue
            i, j = int(starts[e] + t1), int(starts[e] + t2)
        else:
            e1, e2 = rng.choice(len(ends), size=2, replace=False)
            i = int(starts[e1] + rng.integers(lengths[e1]))
            j = int(starts[e2] + rng.integers(lengths[e2]))
        key = (min(i, j), max(i, j))
        diff = np.abs(images[i].astype(np.int16) - images[j].astype(np.int16)).mean()
        if key in seen or diff < min_pixel_diff:
            misses += 1
            continue
        seen.add(key)
        out.append((i, j))  # order kept: image 1 / image 2 as drawn, so both orders occur
    return out


def pair_key(i: int, j: int) -> str:
    return f"{i}-{j}"


# ------------------------------------------------------------------------------------------------- log


class LabelLog:
    """Append-only JSON lines, one per answered pair, each flushed and fsynced before the call returns."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        """Every complete record (a line torn by a crash is skipped with a warning)."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning(
                    "%s line %d is incomplete (a crash while writing): ignored, it will be re-asked", self.path, n
                )
        return out

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            with open(self.path, "a") as f:
                if f.tell() > 0 and not self._ends_with_newline():
                    f.write("\n")  # after a torn line: start a fresh one
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def load_labels(path: str | os.PathLike) -> list[dict]:
    """The records of a label log (dicts with `i`, `j`, `label`, ...)."""
    return LabelLog(path).read()


# ---------------------------------------------------------------------------------------------- labelling


def ask_pair(client: ChatClient, task: str, image1: np.ndarray, image2: np.ndarray, stage2_model: str | None) -> dict:
    """Both stages for one pair -> the record fields that come from the model."""
    first = client.complete(stage1_messages(task, image1, image2))
    second = client.complete(stage2_messages(task, first.text), model=stage2_model)
    tokens = {
        k: int(first.usage.get(k, 0) or 0) + int(second.usage.get(k, 0) or 0)
        for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    return {
        "label": parse_label(second.text),
        "stage1": first.text,
        "stage2": second.text,
        "latency_s": first.latency_s + second.latency_s,
        "tokens": tokens,
        "attempts": first.attempts + second.attempts,
    }


def label_pairs(
    client: ChatClient,
    images: np.ndarray,
    pairs: list[tuple[int, int]],
    describe: Callable[[int], dict],
    *,
    task: str,
    log_file: LabelLog,
    concurrency: int,
    stage2_model: str | None = None,
    stop: threading.Event | None = None,
    progress_every: int = 0,
) -> dict:
    """Ask every pair of `pairs` not yet in `log_file` with up to `concurrency` requests in flight.
    `describe(index)` -> {"episode", "step"} of a global step. Returns counts, label histogram, throughput
    (`interrupted`: Ctrl-C stopped it after the requests in flight were written). Raises VLMError on what
    retrying cannot fix, after the answers already received are written."""
    done = {pair_key(r["i"], r["j"]) for r in log_file.read()}
    todo = [p for p in pairs if pair_key(*p) not in done]
    stop = stop or threading.Event()
    counts = {0: 0, 1: 0, -1: 0}
    tokens = 0
    t0 = time.monotonic()

    def one(i: int, j: int) -> dict:
        if stop.is_set():
            return {}
        fields = ask_pair(client, task, images[i], images[j], stage2_model)
        record = {
            "i": i,
            "j": j,
            "a": {**describe(i), "sha": image_sha(images[i])},
            "b": {**describe(j), "sha": image_sha(images[j])},
            **fields,
            "model": client.model,
            "stage2_model": stage2_model or client.model,
            "prompt_version": PROMPT_VERSION,
            "task": task,
            "time": time.time(),
        }
        log_file.append(record)
        return record

    asked, error, interrupted = 0, None, False
    pool = ThreadPoolExecutor(max_workers=max(1, int(concurrency)), thread_name_prefix="vlm")
    try:
        queue = iter(todo)
        running = set()
        while True:
            while not stop.is_set() and error is None and len(running) < max(1, int(concurrency)):
                p = next(queue, None)
                if p is None:
                    break
                running.add(pool.submit(one, *p))
            if not running:
                break
            finished, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    r = fut.result()
                except VLMError as e:
                    error = error or e
                    stop.set()
                    continue
                if r:
                    asked += 1
                    counts[r["label"]] += 1
                    tokens += r["tokens"]["total_tokens"]
                    if progress_every and asked % progress_every == 0:
                        log.info(
                            "labelled %d/%d pairs (%.1f pairs/s)", asked, len(todo), asked / (time.monotonic() - t0)
                        )
    except KeyboardInterrupt:  # Ctrl-C: ask nothing new, let the requests in flight finish and be written
        stop.set()
        interrupted = True
        log.warning("interrupted: waiting for the %d requests in flight (their answers are kept)", len(running))
        wait(running)
        asked += sum(1 for f in running if f.exception() is None and f.result())
    finally:
        pool.shutdown(wait=True)
    wall = time.monotonic() - t0
    summary = {
        "planned": len(pairs),
        "already_labelled": len(pairs) - len(todo),
        "asked": asked,
        "labels": {str(k): v for k, v in counts.items()},
        "abstain_rate": counts[-1] / asked if asked else None,
        "tokens": tokens,
        "wall_s": wall,
        "pairs_per_s": asked / wall if wall > 0 else None,
        "retries": client.retries,
        "stopped": stop.is_set(),
        "interrupted": interrupted,
    }
    if error is not None:
        summary["error"] = str(error)
        raise VLMError(f"{error} ({asked} answers written before it are kept in {log_file.path})") from error
    return summary
