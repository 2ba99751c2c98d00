"""Episode events from any device's keys or buttons, queued for whoever polls them.

A queue rather than callbacks: device reader threads push, the recorder and an `OperatorSuccess` reward pull at
their own tick, and `take("success")` lets the reward consume its event without eating the recorder's.
"""

from __future__ import annotations

import collections
import logging
import threading

log = logging.getLogger(__name__)

EPISODE_EVENTS = ("save", "rerecord", "stop", "success")


class EpisodeControls:
    """Thread-safe FIFO of episode events ("save", "rerecord", "stop", "success") pushed by devices, polled by the
    recorder; a consumer interested in one event only uses `take(event)`, which leaves the others queued."""

    def __init__(self, maxlen: int = 64):
        self._q: collections.deque[str] = collections.deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def push(self, event: str) -> None:
        if event not in EPISODE_EVENTS:
            raise ValueError(f"unknown episode event {event!r}; choose one of: {', '.join(EPISODE_EVENTS)}")
        with self._lock:
            self._q.append(event)
        log.info("episode control: %s", event)

    def poll(self) -> str | None:
        """Pop and return the oldest pending event, or None."""
        with self._lock:
            return self._q.popleft() if self._q else None

    def take(self, event: str) -> bool:
        """Remove every pending `event` and say whether there was one; other events stay queued, in order."""
        if event not in EPISODE_EVENTS:
            raise ValueError(f"unknown episode event {event!r}; choose one of: {', '.join(EPISODE_EVENTS)}")
        with self._lock:
            n = len(self._q)
            kept = [e for e in self._q if e != event]
            if len(kept) == n:
                return False
            self._q.clear()
            self._q.extend(kept)
            return True

    def clear(self) -> None:
        with self._lock:
            self._q.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._q)
