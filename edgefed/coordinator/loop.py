"""THE round loop, written once, over a :class:`Collector` (Flower's model: the loop talks
to a grid; simulation and deployment only swap the grid).

Per round: the collector says which devices are online, the engine samples them and builds
their tasks, the collector delivers the tasks and gathers updates until every sampled
device answered or the deadline passed (each update goes through the engine's intake, or,
sharded, through the aggregator workers' same intake), the engine closes the round, the
checkpoint is written atomically and the metrics line appended.

Collectors: :class:`InProcessCollector` (``edgefed.simulate``, tests, benchmarks: device
workers called in this process), ``coordinator.service.MqttCollector`` (a fleet over MQTT)
and ``sharding.collector.ShardedCollector`` (MQTT with aggregator workers). An asynchronous
mode (FedBuff) will be another collector feeding ``RoundEngine.add_accepted``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefed.coordinator.artifact import artifact_dir_for, write_engine_artifact
from edgefed.coordinator.checkpoint import load_checkpoint, save_checkpoint
from edgefed.coordinator.metrics import MetricsWriter, RoundMetrics
from edgefed.coordinator.rounds import RoundEngine

__all__ = ["Collector", "InProcessCollector", "run_rounds"]

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
    """Run until ``engine.round == rounds`` (resuming from ``checkpoint`` if it exists)."""
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and ck.exists():
        saved = load_checkpoint(ck)
        engine.restore(saved)
        log.info("resumed from %s after round %d", ck, saved.round)
    out: list[RoundMetrics] = []
    try:
        collector.start()
        while not collector.stopped and engine.round < rounds:
            online = collector.wait_online(engine.cfg.min_devices)
            if collector.stopped:
                break
            tasks = engine.start_round(online, sharded=collector.sharded)
            collector.send(tasks)
            merged = collector.collect(time.monotonic() + engine.cfg.round_timeout)
            if collector.stopped:
                break
            m = engine.finish_round(merged)
            if ck is not None:
                save_checkpoint(ck, engine.checkpoint())
                write_engine_artifact(artifact_dir_for(ck), engine)
            if metrics is not None:
                metrics.write(m, rounds)
            collector.published(m)
            out.append(m)
        if out and not collector.stopped and engine.round >= rounds:
            collector.deliver_final_model()
    finally:
        collector.close()
    return out


class InProcessCollector(Collector):
    """Device workers called in this process (no network): the same task and update bytes
    as over MQTT. ``workers``: device id -> object with ``handle_task(bytes) -> bytes|None``."""

    def __init__(self, engine: RoundEngine, workers: Mapping[str, Any]) -> None:
        self.engine = engine
        self.workers = dict(workers)
        self._tasks: Mapping[str, bytes] = {}

    def wait_online(self, need: int) -> list[str]:
        if len(self.workers) < need:
            raise TimeoutError(f"only {len(self.workers)} of {need} devices exist")
        return sorted(self.workers)

    def send(self, tasks: Mapping[str, bytes]) -> None:
        self._tasks = tasks

    def collect(self, deadline: float) -> None:
        for d, task in self._tasks.items():
            out = self.workers[d].handle_task(task)
            if out is not None:
                self.engine.handle_update(d, out)
        self._tasks = {}
