"""Settings of an aggregator worker (``edgefed aggregator --config worker.toml``) and of the
coordinator's side of sharded aggregation (the ``[sharding]`` table).

Worker TOML::

    [worker]
    id = "agg-1"              # unique per worker process; topic level, [A-Za-z0-9_.-]
    group = "aggregators"     # shared-subscription group ($share/<group>/...)
    heartbeat_interval = 1.0  # seconds between status messages (progress + liveness)
    retain_bytes = 536870912  # accepted update bytes kept to re-issue a partial on conflict
    max_pending = 256         # updates for a round not yet announced, held until it is
    threads = 0               # codec accumulate threads (0: library default)

    [transport]               # edgefed.transport.TransportConfig keys (docs/configuration.md)
    url = "mqtt://broker:1883"
    fleet = "default"

The worker's MQTT session always expires when it disconnects (session_expiry = 0):
mosquitto 2.0.11 keeps round-robining shared-subscription messages to a dead member's
persistent session (measured: half the updates of a 2-member group were stuck in the dead
member's queue), so a worker must never keep its session across a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefed.config.schema import ConfigFile, FieldError, Section, check_fields, option
from edgefed.transport import TransportConfig
from edgefed.transport.config import TRANSPORT, topic_level

__all__ = ["SHARDING", "WORKER_FILE", "ShardingConfig", "WorkerConfig"]

# A worker's [transport] unless its file says otherwise: MQTT 5 (shared subscriptions) and a
# session that ends with the connection (see the module docstring).
WORKER_TRANSPORT = {"protocol": "5", "session_expiry": 0}


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str = option(key="id", doc="unique per worker process; a topic level")
    group: str = option("aggregators", doc="shared-subscription group ($share/<group>/...)")
    heartbeat_interval: float = option(
        1.0, min=0.05, max=60, doc="seconds between status messages (progress + liveness)"
    )
    retain_bytes: int = option(
        512 * 1024 * 1024, min=0, max=1 << 40, doc="accepted update bytes kept for a re-issue"
    )
    max_pending: int = option(
        256, min=0, max=1_000_000, doc="updates for a round not yet announced, held until it is"
    )
    threads: int = option(0, min=0, max=256, doc="codec accumulate threads (0: library default)")
    transport: TransportConfig = field(
        default_factory=lambda: TransportConfig(**WORKER_TRANSPORT)  # type: ignore[arg-type]
    )

    def __post_init__(self) -> None:
        topic_level("worker", "id", "worker id", self.worker_id)
        topic_level("worker", "group", "worker group", self.group)
        check_fields(self, "worker")
        if self.transport.session_expiry != 0:
            raise FieldError(
                "transport",
                "session_expiry",
                "expected 0 for an aggregator worker (a persistent session would keep receiving "
                "its share of updates after the worker died), "
                f"found {self.transport.session_expiry}",
            )
        if self.transport.protocol == "3.1.1":
            raise FieldError(
                "transport", "protocol", 'expected "5" or "auto": workers need MQTT 5 shared '
                'subscriptions, found "3.1.1"'
            )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: ConfigFile | None = None) -> WorkerConfig:
        src = source or ConfigFile(d)
        src.check_sections(["worker", "transport"])
        values = src.read(WORKER)
        transport = {**WORKER_TRANSPORT, **src.table("transport")}
        values["transport"] = src.section(TRANSPORT, transport)
        return src.build(WORKER, values)

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        src = ConfigFile.load(path)
        return cls.from_dict(src.data, src)

    def with_id(self, worker_id: str) -> WorkerConfig:
        return replace(self, worker_id=worker_id)


@dataclass(frozen=True)
class ShardingConfig:
    """The coordinator's ``[sharding]`` table.

    ``on_worker_loss``: ``"redeliver"`` (default) re-sends the round's task to every sampled
    device whose update no surviving worker has reported; the device agent answers a repeated
    task with its stored update (same update id), which a surviving worker counts. ``"drop"``
    ends the round without the lost updates and reports them as dropped.
    """

    workers: int = option(1, min=1, max=10_000, doc="workers to expect before a round starts")
    group: str = option("aggregators", doc="the workers' shared-subscription group")
    heartbeat_timeout: float = option(
        5.0, min=0.1, max=3600, doc="no status for this long: the worker is declared dead"
    )
    close_timeout: float = option(
        30.0, min=0.1, max=86400, doc="seconds to wait for partials after the close"
    )
    worker_wait: float = option(
        120.0, above=0, max=86400, doc="seconds to wait for `workers` workers at start"
    )
    on_worker_loss: str = option(
        "redeliver", choices=("redeliver", "drop"), doc="a dead worker's updates: re-sent or lost"
    )
    max_keys: int = option(1_000_000, min=1, max=100_000_000, doc="coordinates per partial")

    def __post_init__(self) -> None:
        topic_level("sharding", "group", "worker group", self.group)
        check_fields(self, "sharding")

    @classmethod
    def from_dict(cls, t: dict[str, Any], source: ConfigFile | None = None) -> ShardingConfig:
        return (source or ConfigFile({"sharding": t})).section(SHARDING, t)


WORKER = Section("worker", WorkerConfig, doc="this aggregator worker", fields=tuple(
    f for f in WorkerConfig.__dataclass_fields__ if f != "transport"
))  # fmt: skip
SHARDING = Section("sharding", ShardingConfig, doc="aggregator workers sum the updates")
# Every table of a worker file, in order (docs/configuration.md is generated from these).
WORKER_FILE = (WORKER, TRANSPORT)
