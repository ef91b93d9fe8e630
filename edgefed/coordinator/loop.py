"""THE round loop, written once, over a :class:`Collector` (Flower's model: the loop talks
to a grid; simulation and deployment only swap the grid).

Per round: the collector says which devices are online, the engine samples them and builds
their tasks, the collector delivers the tasks and gathers updates until every sampled
device answered or the deadline passed (each update goes through the engine's intake, or,
sharded, through the aggregator workers' same intake), the engine closes the round, the
checkpoint is written atomically and the metrics line appended.

Asynchronous mode (FedBuff, ``[coordinator] mode = "async"``) is the same loop with another
step: instead of one round, :func:`_fill_buffer` keeps up to ``max_concurrent`` tasks out
(each idle online device gets one on the current model as soon as it is idle) and feeds
every update through the same intake and aggregation until ``buffer_size`` were accepted;
then the engine closes the buffer like a round (one model version, one checkpoint, one
metrics line). ``rounds`` then counts model versions.

Collectors: :class:`InProcessCollector` (``edgefed.simulate``, tests, benchmarks: device
workers called in this process, optionally on a simulated clock with per-device speed,
availability and link rate: ``fleet_clock.FleetProfile``),
``coordinator.service.MqttCollector`` (a fleet over MQTT) and
``sharding.collector.ShardedCollector`` (MQTT with aggregator workers; async buffers go
through :func:`_sharded_buffer`: one dispatch, one worker round, one merge per version).
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefed.coordinator.artifact import artifact_dir_for, write_engine_artifact
from edgefed.coordinator.checkpoint import load_checkpoint, save_checkpoint
from edgefed.coordinator.fleet_clock import Availability, FleetProfile
from edgefed.coordinator.journal import Journal, journal_path
from edgefed.coordinator.metrics import MetricsWriter, RoundMetrics
from edgefed.coordinator.rounds import RoundEngine

__all__ = ["Collector", "FleetProfile", "InProcessCollector", "run_rounds"]

log = logging.getLogger(__name__)


class Collector(ABC):
    """Where a round's tasks go and its updates come from."""

    sharded = False  # the round closes from aggregator workers' sums, not from updates here

    def start(self) -> None:
        """Connect (and wait for helpers such as aggregator workers)."""
        return None

    def close(self) -> None:
        """Disconnect; called once when the loop ends, however it ends."""
        return None

    @property
    def stopped(self) -> bool:
        return False

    def clock(self) -> float:
        """Seconds on the collector's clock (simulated fleets: simulated time)."""
        return time.monotonic()

    def online_now(self) -> list[str]:
        """The devices online now, without waiting (asynchronous dispatch)."""
        return self.wait_online(1)

    @abstractmethod
    def wait_online(self, need: int) -> list[str]:
        """The devices to sample from, once at least ``need`` are online (TimeoutError if
        they never are)."""

    @abstractmethod
    def send(self, tasks: Mapping[str, bytes]) -> None:
        """Announce the engine's open round and deliver each sampled device its task."""

    @abstractmethod
    def collect(self, deadline: float) -> Any:
        """Hand updates to the engine until all sampled devices answered or ``deadline``
        (monotonic); sharded collectors return the workers' merged sums."""

    def published(self, m: RoundMetrics) -> None:
        """The round is closed and recorded (e.g. publish its metrics)."""
        return None

    def deliver_final_model(self) -> None:
        """The run is complete: hand the devices the model it ended with."""
        return None


def run_rounds(
    engine: RoundEngine,
    collector: Collector,
    rounds: int,
    checkpoint: str | Path | None = None,
    metrics: MetricsWriter | None = None,
) -> list[RoundMetrics]:
    """Run until ``engine.round == rounds`` (resuming from ``checkpoint`` if it exists);
    in asynchronous mode a "round" is a model version (one buffer of updates)."""
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and ck.exists():
        saved = load_checkpoint(ck)
        engine.restore(saved)
        log.info("resumed from %s after round %d", ck, saved.round)
    step = _one_round
    if engine.asynchronous:
        step = _sharded_buffer if collector.sharded else _fill_buffer
    # async: tasks out and updates buffered since the checkpoint (coordinator/journal.py)
    journal = Journal(journal_path(ck)) if ck is not None and engine.asynchronous else None
    out: list[RoundMetrics] = []
    try:
        collector.start()
        t0 = collector.clock()
        if journal is not None and ck is not None:
            if not ck.exists():  # the journal's anchor: version 0 of this run
                save_checkpoint(ck, engine.checkpoint())
            engine.resume(journal, t0, collector.sharded)
        before = engine.history[-1].get("clock_s", 0.0) if engine.history else 0.0
        while not collector.stopped and engine.round < rounds:
            merged = step(engine, collector)
            if collector.stopped:
                break
            m = engine.finish_round(merged, clock_s=before + collector.clock() - t0)
            if ck is not None:
                save_checkpoint(ck, engine.checkpoint())
                if journal is not None:  # after the checkpoint: a crash between keeps both
                    journal.start(engine.round, engine.run_id)
                write_engine_artifact(artifact_dir_for(ck), engine)
            if metrics is not None:
                metrics.write(m, rounds)
            collector.published(m)
            out.append(m)
        if out and not collector.stopped and engine.round >= rounds:
            collector.deliver_final_model()
    finally:
        collector.close()
        if journal is not None:
            journal.close()
            engine.journal = None
    return out


def _one_round(engine: RoundEngine, collector: Collector) -> Any:
    """A synchronous round: sample the online devices, send, collect until all answered or
    the deadline (returns the sharded collectors' merged sums)."""
    online = collector.wait_online(engine.cfg.min_devices)
    if collector.stopped:
        return None
    tasks = engine.start_round(online, sharded=collector.sharded)
    collector.send(tasks)
    return collector.collect(collector.clock() + engine.cfg.round_timeout)


def _fill_buffer(engine: RoundEngine, collector: Collector) -> None:
    """One asynchronous model version: keep idle online devices busy with tasks on the
    current model and collect until ``buffer_size`` updates were accepted."""
    engine.open_buffer(collector.clock())
    while not collector.stopped and not engine.buffer_full():
        engine.expire(collector.clock())
        if engine.outstanding:
            online = collector.online_now()
        else:  # nothing out: wait until the fleet is there
            online = collector.wait_online(engine.cfg.min_devices)
        if collector.stopped:
            break
        tasks = engine.dispatch(online, collector.clock())
        if tasks:
            collector.send(tasks)
        collector.collect(engine.next_deadline(collector.clock()))


def _sharded_buffer(engine: RoundEngine, collector: Collector) -> Any:
    """One asynchronous model version summed by aggregator workers: idle online devices get
    a task on the current model (announced to the workers with every task out, before the
    tasks are published), then the workers collect until ``buffer_size`` updates were
    reported (or ``round_timeout``); returns their merged sums. A device gets at most one
    task per buffer here: the coordinator learns which tasks were answered from the merge."""
    engine.open_buffer(collector.clock(), sharded=True)
    engine.expire(collector.clock())
    if engine.outstanding:
        online = collector.online_now()
    else:
        online = collector.wait_online(engine.cfg.min_devices)
    if collector.stopped:
        return None
    collector.send(engine.dispatch(online, collector.clock()))
    return collector.collect(collector.clock() + engine.cfg.round_timeout)


class InProcessCollector(Collector):
    """Device workers called in this process (no network): the same task and update bytes
    as over MQTT. ``workers``: device id -> object with ``handle_task(bytes) -> bytes|None``.
    A device trains when its task is sent; with a :class:`FleetProfile` its update arrives
    when its simulated time says (``clock`` is then simulated seconds)."""

    def __init__(
        self, engine: RoundEngine, workers: Mapping[str, Any], profile: FleetProfile | None = None
    ) -> None:
        self.engine = engine
        self.workers = dict(workers)
        self.profile = profile
        self._now = 0.0
        self._events: list[tuple[float, int, str, bytes]] = []  # (arrival, n, device, update)
        self._n = 0
        self._index = {d: i for i, d in enumerate(self.workers)}
        self._avail: dict[str, Availability] = {}
        if profile is not None:
            if len(profile.speeds) != len(self.workers):
                raise ValueError(f"{len(profile.speeds)} speeds for {len(self.workers)} devices")
            rng = random.Random(profile.seed)
            self._avail = {
                d: Availability(random.Random(rng.random()), profile.offline_fraction,
                                 profile.offline_period)
                for d in self.workers
            }  # fmt: skip

    def clock(self) -> float:
        return self._now if self.profile is not None else time.monotonic()

    def online_now(self) -> list[str]:
        avail = self._avail
        return sorted(d for d in self.workers if not avail or avail[d].online(self._now))

    def wait_online(self, need: int) -> list[str]:
        if len(self.workers) < need:
            raise TimeoutError(f"only {len(self.workers)} of {need} devices exist")
        step = (self.profile.offline_period / 10) if self.profile else 0.0
        while len(online := self.online_now()) < need:
            self._now += step  # simulated time passes until enough devices are back
        return online

    def send(self, tasks: Mapping[str, bytes]) -> None:
        for d, task in tasks.items():
            out = self.workers[d].handle_task(task)
            if out is None:
                continue
            at = self._now
            if self.profile is not None:
                i = self._index[d]
                work = self.profile.step_time * self.profile.speeds[i]
                if self.profile.links is not None:
                    work += len(out) / self.profile.links[i]
                at = self._avail[d].finish(self._now, work)
            self._n += 1
            heapq.heappush(self._events, (at, self._n, d, out))

    def collect(self, deadline: float) -> None:
        """Deliver updates in arrival order until the engine needs nothing more now; on a
        simulated clock, none after ``deadline`` (the clock then stands at the deadline)."""
        while self._events and not self.engine.collect_done(self.online_now()):
            at, _, d, out = self._events[0]
            if self.profile is not None and at > deadline:
                break
            heapq.heappop(self._events)
            self._now = max(self._now, at)
            self.engine.handle_update(d, out)
        if self.profile is not None and not self.engine.collect_done(self.online_now()):
            self._now = max(self._now, deadline)
