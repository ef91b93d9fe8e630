"""The round loop's collector for a sharded coordinator: aggregator workers read the
updates (shared subscription) and check them with the coordinator's own intake; this
process reads presence, announces each round to the workers BEFORE the tasks go out, and
closes the round from their merged partial sums (:mod:`.driver`, :mod:`.merge`)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from edgefed.coordinator.rounds import RoundEngine
from edgefed.coordinator.service import MqttCollector
from edgefed.security.downlink import DownlinkSigner
from edgefed.sharding.config import ShardingConfig
from edgefed.sharding.driver import ShardedAggregation
from edgefed.sharding.merge import MergeResult
from edgefed.transport import TransportConfig

__all__ = ["ShardedCollector"]


class ShardedCollector(MqttCollector):
    sharded = True

    def __init__(
        self,
        engine: RoundEngine,
        transport: TransportConfig,
        sharding: ShardingConfig,
        client_id: str = "edgefed-coordinator",
        signer: DownlinkSigner | None = None,
        wait_timeout: float = 300.0,
        sharding_transport: TransportConfig | None = None,
    ) -> None:
        super().__init__(engine, transport, client_id, signer, wait_timeout, read_updates=False)
        # this process: a buffer announced again by another one (a restart) reopens at the
        # workers with the sums they hold (sharding/worker.py); the same one never reopens
        self.instance = secrets.token_hex(8)
        self.agg = ShardedAggregation(
            sharding_transport or transport, engine.schema, sharding, resend=self.resend,
            client_id=f"{client_id}-agg",
        )  # fmt: skip

    def start(self) -> None:
        super().start()
        self.agg.start(timeout=None)
        self.agg.wait_for_workers()

    def close(self) -> None:
        super().close()
        self.agg.stop()

    def send(self, tasks: Mapping[str, bytes]) -> None:
        ann = self.engine.announcement(for_workers=True)
        if ann.staleness is not None:  # a buffer: who announces it (worker.py, _reannounced)
            ann.staleness.update(run=self.engine.run_id, coordinator=self.instance)
        self.agg.announce(ann)  # before any update
        super().send(tasks)

    def collect(self, deadline: float) -> MergeResult:
        # device presence waits in the collector's own inbox meanwhile
        done = self.agg.all_reported
        if self.engine.asynchronous:  # a buffer: K updates reported by the workers
            k = self.engine.cfg.buffer_size
            done = lambda: len(self.agg.reported_devices()) >= k  # noqa: E731
        self.agg.pump(deadline, lambda: self.stopped or done())
        return self.agg.close_round()
