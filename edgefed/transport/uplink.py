"""Uplink rate measured from the broker's acknowledgements, smoothed (issue 15).

Why from PUBACKs: bytes written to a socket only reach the kernel's buffer, so timing
``send()`` measures memory speed; a QoS 1 PUBACK proves the broker holds the bytes. The
client reports every publish it registers (:meth:`UplinkMeter.sent`) and every
acknowledgement (:meth:`UplinkMeter.acked`). A *busy period* runs from the first publish
sent while nothing was outstanding until the moment nothing is outstanding again; its
sample is the acknowledged bytes over its duration. Short periods (below ``min_bytes``)
measure the round-trip time rather than the link and are ignored; a period cut by a
disconnect is discarded (the time offline is not link speed). Samples feed an exponentially
weighted moving average, which the agent reports with its presence message.
"""

from __future__ import annotations

import threading
import time


class UplinkMeter:
    """Thread-safe: publishes are registered from the caller's thread, acks arrive on the
    network thread."""

    def __init__(self, alpha: float = 0.3, min_bytes: int = 16 * 1024) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.min_bytes = min_bytes
        self._lock = threading.Lock()
        self._size: dict[int, int] = {}  # outstanding publish id -> bytes
        self._early: set[int] = set()  # acks that raced ahead of sent() (network thread)
        self._start: float | None = None  # start of the current busy period
        self._acked = 0  # bytes acknowledged in the current busy period
        self.rate: float | None = None  # smoothed bytes/s; None until the first sample
        self.samples = 0
        self.last_sample: float | None = None

    def sent(self, mid: int, size: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._start is None:
                self._start, self._acked = now, 0
            self._size[mid] = size
        if mid in self._early:
            self._early.discard(mid)
            self.acked(mid, now)

    def acked(self, mid: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            size = self._size.pop(mid, None)
            if size is None:
                if len(self._early) < 10_000:
                    self._early.add(mid)
                return
            if self._start is None:
                return  # a period cut by a disconnect
            self._acked += size
            if self._size:
                return
            elapsed = now - self._start
            if self._acked >= self.min_bytes and elapsed > 0:
                self._add(self._acked / elapsed)
            self._start = None

    def interrupted(self) -> None:
        """The connection dropped: the current busy period is not a measurement."""
        with self._lock:
            self._start = None
            self._acked = 0

    def resumed(self, now: float | None = None) -> tuple[int, int]:
        """Reconnected: what is still outstanding is resent now (paho resends every QoS 1
        publish not acknowledged, with DUP set) and opens a new busy period. Returns the
        (publishes, bytes) resent."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._size:
                self._start, self._acked = now, 0
            return len(self._size), sum(self._size.values())

    def outstanding(self) -> int:
        with self._lock:
            return sum(self._size.values())

    def _add(self, sample: float) -> None:
        self.rate = (
            sample if self.rate is None else self.alpha * sample + (1 - self.alpha) * self.rate
        )
        self.samples += 1
        self.last_sample = sample


__all__ = ["UplinkMeter"]
