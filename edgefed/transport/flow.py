"""A window of unacknowledged QoS 1 publishes.

mosquitto queues at most ``max_queued_messages`` (default 1000) per client and silently
DROPS QoS 1 messages beyond it when a subscriber falls behind (measured, see the shared
baselines). A sender that never has more than ``size`` unacknowledged publishes in flight
cannot overrun that queue from its side; the default 100 leaves room for many senders.
"""

from __future__ import annotations

import threading


class FlowWindow:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self.size = size
        self._cond = threading.Condition()
        self._inflight: set[int] = set()
        self._pending = 0  # acquired, mid not yet known
        self._early: set[int] = set()  # acks that arrived before the mid was registered
        self.peak = 0

    @property
    def inflight(self) -> int:
        with self._cond:
            return len(self._inflight) + self._pending

    def acquire(self, timeout: float | None = None) -> bool:
        """Block until a slot is free; False on timeout."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self._inflight) + self._pending < self.size, timeout
            )
            if ok:
                self._pending += 1
                self.peak = max(self.peak, len(self._inflight) + self._pending)
            return ok

    def register(self, mid: int) -> None:
        """The acquired slot now belongs to paho message id ``mid``."""
        with self._cond:
            self._pending -= 1
            if mid in self._early:
                self._early.discard(mid)
                self._cond.notify_all()
            else:
                self._inflight.add(mid)

    def cancel(self) -> None:
        """Give back an acquired slot whose publish failed before getting a mid."""
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()

    def release(self, mid: int) -> None:
        """PUBACK for ``mid`` (called from the network thread)."""
        with self._cond:
            if mid in self._inflight:
                self._inflight.discard(mid)
            elif self._pending:
                self._early.add(mid)  # ack raced ahead of register()
            self._cond.notify_all()

    def wait_empty(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._inflight and not self._pending, timeout)
