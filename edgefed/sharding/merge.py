"""Coordinator-side merge of partial aggregates, with exactly-once accounting.

Exactly once: each sampled device's update is counted in at most one partial. A worker
dedupes what reaches it (one update per device per round); a device that re-sent its
update can still reach two workers, so the merger checks the key lists of all partials
before summing: a device found in more than one partial is kept in the partial of the
lowest worker id and :meth:`PartialMerger.conflicts` names the other workers, which are
asked to re-issue their partial without it (``amend``). A partial that still overlaps,
or cannot be re-issued, is rejected whole and its devices reported as dropped — it is
never added, so nothing is counted twice.

Fencing: every partial carries its worker's random instance id; a partial from an
instance the coordinator has declared dead (or does not know) is rejected, so a worker
that was only slow cannot add updates the coordinator already wrote off or re-requested.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edgefed.codec import CodecError, ModelSchema
from edgefed.protocol import Drop, DropReason
from edgefed.sharding.partial import Key, Partial, decode_partial

log = logging.getLogger(__name__)

__all__ = ["MergeResult", "PartialMerger"]


@dataclass
class MergeResult:
    round: int
    sums: dict[str, np.ndarray]  # shaped like the schema, float32
    weights: dict[str, np.ndarray]  # per-coordinate weight sums, float32
    keys: list[Key]  # every counted update, exactly once
    per_worker: dict[str, int]  # worker -> updates counted from it
    rejected_partials: list[tuple[str, str]] = field(default_factory=list)  # (worker, reason)
    dropped: dict[str, Drop] = field(default_factory=dict)  # device -> why it is not counted
    worker_rejected_updates: int = 0  # updates the workers dropped as invalid
    worker_drops: list[Drop] = field(default_factory=list)  # those the workers reported
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # worker -> devices amended
    merge_seconds: float = 0.0

    @property
    def count(self) -> int:
        return len(self.keys)

    def average(self) -> dict[str, np.ndarray]:
        """sums / weights per coordinate; 0 where nothing was received."""
        out = {}
        for name, s in self.sums.items():
            w = self.weights[name]
            out[name] = np.divide(s, w, out=np.zeros_like(s), where=w > 0)
        return out


class PartialMerger:
    """Collects the partials of one round and merges them (transport-free, testable alone)."""

    def __init__(
        self, schema: ModelSchema, rnd: int, max_keys: int = 1_000_000, task_rounds: bool = False
    ) -> None:
        self.schema = schema
        self.task_rounds = task_rounds  # an asynchronous buffer: keys carry task rounds
        self.round = rnd
        self.max_keys = max_keys
        self.instances: dict[str, str] = {}  # live worker -> instance
        self.dead: set[tuple[str, str]] = set()  # (worker, instance) written off
        self.partials: dict[str, Partial] = {}
        self.rejected: list[tuple[str, str]] = []
        self.dropped: dict[str, Drop] = {}

    def set_live(self, worker: str, instance: str) -> None:
        self.instances[worker] = instance

    def declare_dead(self, worker: str, reason: str) -> list[Key]:
        """Fence ``worker``: forget its partial (if any); returns the keys that go with it."""
        inst = self.instances.pop(worker, None)
        if inst is not None:
            self.dead.add((worker, inst))
        p = self.partials.pop(worker, None)
        if p is not None:
            self.rejected.append((worker, reason))
            return list(p.keys)
        return []

    def add(self, worker: str, payload: bytes) -> Partial | None:
        """Validate one partial; None (reason logged and kept) if rejected."""
        try:
            p = decode_partial(
                payload, self.schema, max_keys=self.max_keys, task_rounds=self.task_rounds
            )
        except CodecError as e:
            return self._reject(worker, f"invalid partial: {e.reason}")
        if p.worker != worker:
            return self._reject(worker, f"partial names worker {p.worker!r}, topic {worker!r}")
        if p.round != self.round:
            return self._reject(worker, f"partial for round {p.round}, merging {self.round}")
        if (worker, p.instance) in self.dead:
            return self._reject(worker, "partial from a worker instance declared dead")
        if self.instances.get(worker) != p.instance:
            return self._reject(worker, "partial from an unknown worker instance")
        old = self.partials.get(worker)
        if old is not None and p.amendment <= old.amendment:
            return self._reject(worker, f"stale partial (amendment {p.amendment})")
        self.partials[worker] = p
        return p

    def _reject(self, worker: str, reason: str) -> None:
        log.warning("round %d: rejected partial from %s: %s", self.round, worker, reason)
        self.rejected.append((worker, reason))
        return None

    def conflicts(self) -> dict[str, list[str]]:
        """worker -> devices it must drop: a device counted by several workers stays with
        the lowest worker id (deterministic, so a re-run resolves the same way)."""
        owner: dict[str, str] = {}
        out: dict[str, list[str]] = {}
        for w in sorted(self.partials):
            for dev, _, _ in self.partials[w].keys:
                if dev in owner:
                    out.setdefault(w, []).append(dev)
                else:
                    owner[dev] = w
        return out

    def reject_conflicting(self) -> None:
        """Last resort after amendments: reject every partial that still overlaps another
        (its devices are reported as dropped unless counted by the kept partial)."""
        for w in self.conflicts():
            keys = self.declare_dead(w, "partial still overlaps another after amendment")
            for dev, _, _ in keys:
                reason = f"worker {w}: conflicting partial rejected"
                self.dropped.setdefault(dev, Drop(dev, DropReason.WORKER_LOST, reason))

    def merge(self) -> MergeResult:
        """Sum the accepted, non-overlapping partials (float64, sorted by worker id)."""
        t0 = time.perf_counter()
        if self.conflicts():
            raise RuntimeError("partials overlap: resolve conflicts() first")
        sums = {n: np.zeros(self.schema.size(n), np.float64) for n in self.schema}
        wts = {n: np.zeros(self.schema.size(n), np.float64) for n in self.schema}
        keys: list[Key] = []
        per_worker: dict[str, int] = {}
        bad = 0
        for w in sorted(self.partials):
            p = self.partials[w]
            per_worker[w] = p.count
            bad += p.rejected
            keys += p.keys
            for n in p.sums:
                sums[n] += p.sums[n]
                wts[n] += p.weights[n]  # [1] broadcasts: every coordinate got that weight
        counted = {k[0] for k in keys}
        for dev in counted:
            self.dropped.pop(dev, None)
        res = MergeResult(
            self.round,
            {n: sums[n].astype(np.float32).reshape(self.schema[n]) for n in self.schema},
            {n: wts[n].astype(np.float32).reshape(self.schema[n]) for n in self.schema},
            sorted(keys),
            per_worker,
            list(self.rejected),
            dict(self.dropped),
            bad,
        )
        res.merge_seconds = time.perf_counter() - t0
        return res
