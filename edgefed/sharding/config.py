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

    [transport]               # edgefed.transport.TransportConfig keys
    url = "mqtt://broker:1883"
    fleet = "default"

The worker's MQTT session always expires when it disconnects (session_expiry = 0):
mosquitto 2.0.11 keeps round-robining shared-subscription messages to a dead member's
persistent session (measured: half the updates of a 2-member group were stuck in the dead
member's queue), so a worker must never keep its session across a crash.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefed.transport import TransportConfig, check_name

__all__ = ["ShardingConfig", "WorkerConfig"]


def _table(d: dict[str, Any], name: str, types: dict[str, type | tuple[type, ...]]) -> dict:
    t = d.get(name, {})
    if not isinstance(t, dict):
        raise ValueError(f"[{name}] must be a table")
    for k, v in t.items():
        if k not in types:
            raise ValueError(f"unknown key [{name}] {k}")
        if (isinstance(v, bool) and types[k] is not bool) or not isinstance(v, types[k]):
            raise ValueError(f"[{name}] {k} has the wrong type ({type(v).__name__})")
    return t


@dataclass(frozen=True)
class WorkerConfig:
    worker_id: str
    group: str = "aggregators"
    heartbeat_interval: float = 1.0
    retain_bytes: int = 512 * 1024 * 1024
    max_pending: int = 256
    threads: int = 0
    transport: TransportConfig = field(default_factory=lambda: TransportConfig(protocol="5"))

    def __post_init__(self) -> None:
        check_name("worker id", self.worker_id)
        check_name("worker group", self.group)
        checks = [
            ("heartbeat_interval", 0.05 <= self.heartbeat_interval <= 60),
            ("retain_bytes", 0 <= self.retain_bytes <= 1 << 40),
            ("max_pending", 0 <= self.max_pending <= 1_000_000),
            ("threads", 0 <= self.threads <= 256),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"[worker] {name} out of range: {getattr(self, name)!r}")
        if self.transport.session_expiry != 0:
            raise ValueError(
                "[transport] session_expiry must be 0 for an aggregator worker: a persistent "
                "session would keep receiving its share of updates after the worker died"
            )
        if self.transport.protocol == "3.1.1":
            raise ValueError("[transport] protocol: workers need MQTT 5 shared subscriptions")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerConfig:
        unknown = set(d) - {"worker", "transport"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        w = _table(
            d,
            "worker",
            {
                "id": str,
                "group": str,
                "heartbeat_interval": (int, float),
                "retain_bytes": int,
                "max_pending": int,
                "threads": int,
            },
        )
        if "id" not in w:
            raise ValueError("[worker] id is required")
        t = dict(d.get("transport", {}))
        if not isinstance(d.get("transport", {}), dict):
            raise ValueError("[transport] must be a table")
        t.setdefault("protocol", "5")
        t.setdefault("session_expiry", 0)
        return cls(
            worker_id=w["id"],
            group=w.get("group", "aggregators"),
            heartbeat_interval=float(w.get("heartbeat_interval", 1.0)),
            retain_bytes=w.get("retain_bytes", 512 * 1024 * 1024),
            max_pending=w.get("max_pending", 256),
            threads=w.get("threads", 0),
            transport=TransportConfig.from_dict(t),
        )

    @classmethod
    def load(cls, path: str | Path) -> WorkerConfig:
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
        return cls.from_dict(d)

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

    workers: int = 1  # how many workers to expect before a round starts
    group: str = "aggregators"
    heartbeat_timeout: float = 5.0  # no status for this long: the worker is declared dead
    close_timeout: float = 30.0  # how long to wait for partials after the close
    worker_wait: float = 120.0  # how long to wait for ``workers`` workers at start
    on_worker_loss: str = "redeliver"
    max_keys: int = 1_000_000  # per partial

    def __post_init__(self) -> None:
        check_name("worker group", self.group)
        checks = [
            ("workers", 1 <= self.workers <= 10_000),
            ("heartbeat_timeout", 0.1 <= self.heartbeat_timeout <= 3600),
            ("close_timeout", 0.1 <= self.close_timeout <= 86400),
            ("worker_wait", 0 < self.worker_wait <= 86400),
            ("on_worker_loss", self.on_worker_loss in ("redeliver", "drop")),
            ("max_keys", 1 <= self.max_keys <= 100_000_000),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"[sharding] {name} out of range: {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, t: dict[str, Any]) -> ShardingConfig:
        types: dict[str, type | tuple[type, ...]] = {
            "workers": int,
            "group": str,
            "heartbeat_timeout": (int, float),
            "close_timeout": (int, float),
            "worker_wait": (int, float),
            "on_worker_loss": str,
            "max_keys": int,
        }
        _table({"sharding": t}, "sharding", types)
        kw = {k: (float(v) if types[k] == (int, float) else v) for k, v in t.items()}
        return cls(**kw)
