"""A round's tasks as a read-only mapping whose messages are built when read.

``start_round`` decides everything eagerly (sample, seeds, which devices get the graph, byte
counts) so the round is deterministic and accounted for; only joining (and signing) each
device's bytes waits until the service publishes it. Peak memory then holds one task at a
time instead of one per sampled device (1 byte per parameter each with int8 weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping


class LazyTasks(Mapping[str, bytes]):
    def __init__(self, builders: Mapping[str, Callable[[], bytes]]) -> None:
        self._builders = dict(builders)

    def __getitem__(self, device: str) -> bytes:
        return self._builders[device]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def map(self, fn: Callable[[str, bytes], bytes]) -> LazyTasks:
        """Tasks transformed per device on read (e.g. signed for their topic)."""
        return LazyTasks({d: (lambda d=d: fn(d, self[d])) for d in self._builders})


__all__ = ["LazyTasks"]
