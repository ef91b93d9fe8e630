"""Bounded memory of already-seen keys, so a QoS 1 redelivery is processed once.

QoS 1 is "at least once": after a reconnect the broker (or paho) may deliver a message a
second time. Receivers remember recent keys (message ids; the coordinator also uses
(device, round, update id)) in an insertion-ordered set that forgets the oldest entries past
``capacity``, so memory stays bounded under a flood of distinct ids.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class SeenSet:
    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._keys: OrderedDict[Hashable, None] = OrderedDict()

    def check_and_add(self, key: Hashable) -> bool:
        """True if ``key`` is new (and remember it); False if it was seen before."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[Hashable]:
        return list(self._keys)
