"""A simulated clock for an in-process fleet: per-device speed, link rate and offline
spells (``edgefed.simulate``, benchmarks/intermittent.py). Kept apart from the round loop,
which only asks a collector for its clock; this module only says when a simulated device's
work is done and whether it is online.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["Availability", "FleetProfile"]


@dataclass
class FleetProfile:
    """A simulated clock for an in-process fleet (``edgefed.simulate``, benchmarks).

    A task takes ``step_time * speeds[i]`` simulated seconds of device ``i``'s online time,
    plus its update's bytes / ``links[i]`` (bytes/s) when links are given. Each device is
    offline ``offline_fraction`` of the time, in spells of ``offline_period`` simulated
    seconds on average (exponential on and off spells, seeded), and trains only while
    online: a device that drops out mid-task finishes later. Updates reach the coordinator
    in simulated-time order, so staleness and round times are those of such a fleet while
    every update is still real (trained in onnxruntime, compressed, checked, aggregated)."""

    speeds: Sequence[float]
    step_time: float = 1.0
    offline_fraction: float = 0.0
    offline_period: float = 5.0
    links: Sequence[float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.offline_fraction < 1:
            raise ValueError(f"offline_fraction must be in [0, 1), got {self.offline_fraction}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.speeds):
            raise ValueError("speeds must be positive numbers")
        if self.links is not None and any(not r > 0 for r in self.links):
            raise ValueError("links must be positive rates (bytes/s)")
        if not (self.step_time >= 0 and self.offline_period > 0):
            raise ValueError("step_time must be >= 0 and offline_period > 0")


class Availability:
    """One device's offline spells, generated lazily: [(start, end), ...]."""

    def __init__(self, rng: random.Random, fraction: float, period: float) -> None:
        self.rng, self.fraction, self.off_mean = rng, fraction, period
        self.on_mean = period * (1 - fraction) / fraction if fraction > 0 else math.inf
        self.spells: list[tuple[float, float]] = []
        self.until = 0.0
        if fraction > 0 and rng.random() < fraction:  # starts inside an offline spell
            self.until = rng.expovariate(1 / period)
            self.spells.append((0.0, self.until))

    def _extend(self, t: float) -> None:
        while self.fraction > 0 and self.until <= t:
            a = self.until + self.rng.expovariate(1 / self.on_mean)
            self.until = a + self.rng.expovariate(1 / self.off_mean)
            self.spells.append((a, self.until))

    def online(self, t: float) -> bool:
        self._extend(t)
        return not any(a <= t < b for a, b in self.spells)

    def finish(self, start: float, work: float) -> float:
        """When ``work`` seconds of online time, counted from ``start``, are done."""
        t, left = start, work
        for a, b in self._spells_after(start):
            if b <= t:
                continue
            if a > t and left <= a - t:
                return t + left
            if a > t:
                left -= a - t
            t = b
        return t + left

    def _spells_after(self, start: float) -> Iterator[tuple[float, float]]:
        i = 0
        while True:
            self._extend(start + (i + 1) * self.off_mean * 8)
            while i < len(self.spells):
                yield self.spells[i]
                i += 1
            if self.fraction == 0:
                return
