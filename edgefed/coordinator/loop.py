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

import base64
import heapq
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.coordinator.artifact import artifact_dir_for, write_engine_artifact
from edgefed.coordinator.checkpoint import load_checkpoint, save_checkpoint
from edgefed.coordinator.fleet_clock import Availability, FleetProfile
from edgefed.coordinator.journal import Journal, crash_point, journal_path
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

    def saved_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """What a run resumed from the checkpoint needs of this collector beyond the engine
        (JSON, arrays), or None: over MQTT the devices and workers keep their own state."""
        return None

    def restore_state(self, state: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> bool:
        """Take back :meth:`saved_state`; True if the collector's clock is the saved one
        (the engine then keeps its tasks' issue times)."""
        return False

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
    same_clock = False
    if ck is not None and ck.exists():
        saved = load_checkpoint(ck)
        engine.restore(saved)
        if "collector" in saved.meta:
            try:
                same_clock = collector.restore_state(saved.meta["collector"], saved.extra)
            except ValueError as e:
                raise ValueError(f"{ck}: {e}") from None
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
                _save(ck, engine, collector)
            engine.resume(journal, t0, collector.sharded, restamp=not same_clock)
        before = engine.history[-1].get("clock_s", 0.0) if engine.history else 0.0
        while not collector.stopped and engine.round < rounds:
            merged = step(engine, collector)
            if collector.stopped:
                break
            m = engine.finish_round(merged, clock_s=before + collector.clock() - t0)
            if ck is not None:
                _save(ck, engine, collector)
                if journal is not None:  # after the checkpoint: a crash between keeps both
                    journal.start(engine.round, engine.run_id)
                    crash_point("checkpointed", engine.round)  # TEST HOOK: inert unless set
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


def _save(ck: Path, engine: RoundEngine, collector: Collector) -> None:
    """The engine's checkpoint with the collector's state (one atomic file: a resumed run
    never sees one without the other)."""
    c = engine.checkpoint()
    state = collector.saved_state()
    if state is not None:
        c.meta["collector"], c.extra = state
    save_checkpoint(ck, c)


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
    resend = engine.take_resend()  # after a restart: tasks a kill may have kept in
    if resend:
        collector.send(resend)
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
            _crash_point_published(engine, collector)
        collector.collect(engine.next_deadline(collector.clock()))


def _sharded_buffer(engine: RoundEngine, collector: Collector) -> Any:
    """One asynchronous model version summed by aggregator workers: idle online devices get
    a task on the current model (announced to the workers with every task out, before the
    tasks are published), then the workers collect until ``buffer_size`` updates were
    reported (or ``round_timeout``); returns their merged sums. A device gets at most one
    task per buffer here: the coordinator learns which tasks were answered from the merge."""
    engine.open_buffer(collector.clock(), sharded=True)
    tasks = engine.take_resend()  # after a restart: tasks a kill may have kept in
    engine.expire(collector.clock())
    if engine.outstanding >= engine.cfg.buffer_size:  # the tasks out can fill the buffer
        online = collector.online_now()
    else:
        # They cannot: this one dispatch must reach devices, so wait until the fleet is
        # there. Reading only what had arrived (online_now) found nobody right after a
        # restart, while the presence was still on its way (the collector reads none while
        # the workers collect): the buffer then waited round_timeout for updates of tasks
        # never sent.
        online = collector.wait_online(engine.cfg.min_devices)
    if collector.stopped:
        return None
    tasks.update(engine.dispatch(online, collector.clock()))  # (updates reach the workers)
    collector.send(tasks)
    _crash_point_published(engine, collector)
    return collector.collect(collector.clock() + engine.cfg.round_timeout)


def _crash_point_published(engine: RoundEngine, collector: Collector) -> None:
    """TEST HOOK (coordinator/journal.py ``crash_point``): inert unless set."""
    client = getattr(collector, "client", None)
    crash_point("published", engine.round, getattr(client, "flush", None))


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

    def saved_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Everything a resumed simulation needs to go on exactly as if never stopped: the
        updates in flight (devices here train when their task is sent, so the update of a
        task still out at the checkpoint exists only in this queue: without it the task
        would expire), the simulated clock, each device's availability stream, and the
        error-feedback residuals of devices that keep them (``saved_residual()``)."""
        events = [[at, n, d, base64.b64encode(out).decode()] for at, n, d, out in self._events]
        avail = {
            d: [list(a.rng.getstate()[1]), a.spells, a.until] for d, a in self._avail.items()
        }
        arrays = {}
        for d, w in self.workers.items():
            for name, v in getattr(w, "saved_residual", dict)().items():
                arrays[f"{d}/{name}"] = v
        return {"now": self._now, "n": self._n, "events": events, "avail": avail}, arrays

    def restore_state(self, state: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> bool:
        try:
            self._events = [(float(a), int(n), str(d), base64.b64decode(b))
                            for a, n, d, b in state["events"]]  # fmt: skip
            heapq.heapify(self._events)
            self._n, self._now = int(state["n"]), float(state["now"])
            for d, (rng, spells, until) in state["avail"].items():
                a = self._avail[d]
                a.rng.setstate((3, tuple(rng), None))
                a.spells, a.until = [(float(x), float(y)) for x, y in spells], float(until)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"meta 'collector' is not this fleet's state: {e!r}") from e
        unknown = sorted({d for _, _, d, _ in self._events} - set(self.workers))
        if unknown:
            unknown = unknown[:3]
            raise ValueError(f"meta 'collector': updates in flight from unknown devices {unknown}")
        residuals: dict[str, dict[str, np.ndarray]] = {}
        for key, v in arrays.items():
            d, _, name = key.partition("/")
            residuals.setdefault(d, {})[name] = v
        for d, w in self.workers.items():
            if hasattr(w, "restore_residual"):
                w.restore_residual(self.engine.run_id, residuals.get(d, {}), self.engine.schema)
        return self.profile is not None

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
