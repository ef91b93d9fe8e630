"""The MQTT topic layout of one fleet. Every topic edgefed uses is built here.

``<prefix>/<fleet>/...`` with the default prefix ``edgefed``:

- ``presence/<device>`` (device -> coordinator, QoS 1, retained): JSON, status "online" and
  capabilities; the device's Last Will sets status "offline" when it drops.
- ``round`` (coordinator -> all, QoS 1, retained): JSON announcement of the current round.
- ``task/<device>`` (coordinator -> one device, QoS 1): multipart message (task header JSON,
  global weights encoded by the codec with ``kind="weights"``, the step graph when the
  device lacks it).
- ``update/<device>`` (device -> coordinator, QoS 1): multipart (update header JSON, the
  compressed update, codec ``kind="delta"``).
- ``metrics`` (coordinator -> observers, QoS 1): JSON per finished round.
- ``bundle/<group>`` (operator -> devices of a roll-out group, QoS 1, chunked): a signed
  model bundle; ``bundle-status/<device>`` (device -> operator): the device's JSON report.
- ``agg/...``: the sharded-aggregation topics, see :class:`ShardTopics`.

Why one task topic per device instead of one broadcast model topic: a persistent session
queues exactly the device's own task while it is offline (a retained broadcast would queue
every version), ACLs can restrict each device to its own topics (issue 7), and only sampled
devices pay the download. Large payloads are chunked (see :mod:`edgefed.transport.chunking`).

Device ids and fleet names are restricted to ``[A-Za-z0-9_.-]{1,64}``: they become topic
levels, so ``+``, ``#`` and ``/`` must never appear in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a safe topic level, else raise ValueError naming it."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid {kind} {name!r}: use 1-64 characters of [A-Za-z0-9_.-]")
    return name


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet."""

    fleet: str = "default"
    prefix: str = "edgefed"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        check_name("topic prefix", self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.fleet}"

    def presence(self, device: str) -> str:
        return f"{self.base}/presence/{check_name('device id', device)}"

    def task(self, device: str) -> str:
        return f"{self.base}/task/{check_name('device id', device)}"

    def update(self, device: str) -> str:
        return f"{self.base}/update/{check_name('device id', device)}"

    @property
    def round(self) -> str:
        return f"{self.base}/round"

    @property
    def metrics(self) -> str:
        return f"{self.base}/metrics"

    @property
    def all_presence(self) -> str:
        return f"{self.base}/presence/+"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/update/+"

    def bundle(self, group: str = "all") -> str:
        return f"{self.base}/bundle/{check_name('device group', group)}"

    def bundle_status(self, device: str) -> str:
        return f"{self.base}/bundle-status/{check_name('device id', device)}"

    @property
    def all_bundle_status(self) -> str:
        return f"{self.base}/bundle-status/+"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """Split a topic of this fleet into (kind, device or None); ValueError if foreign."""
        if not topic.startswith(self.base + "/"):
            raise ValueError(f"topic {topic!r} is not under {self.base}/")
        parts = topic[len(self.base) + 1 :].split("/")
        if len(parts) == 1 and parts[0] in ("round", "metrics"):
            return parts[0], None
        if len(parts) == 2 and parts[0] in ("presence", "task", "update"):
            return parts[0], check_name("device id", parts[1])
        raise ValueError(f"unknown topic {topic!r}")


@dataclass(frozen=True)
class ShardTopics:
    """Topics of sharded aggregation, under the fleet's base (``<prefix>/<fleet>/agg/...``).

    - ``agg/round`` (coordinator -> workers, QoS 1, retained): the open round: number, model
      version, schema, sampled devices and the tensors each may send (a
      :class:`~edgefed.protocol.headers.RoundAnnouncement`). Retained so a worker that
      (re)starts mid-round joins it.
    - ``agg/close`` (coordinator -> workers, QoS 1): close round r; every worker answers with
      its partial.
    - ``agg/amend/<worker>`` (coordinator -> one worker): re-issue the partial without some keys.
    - ``agg/presence/<worker>`` (worker, QoS 1, retained, Last Will "offline").
    - ``agg/status/<worker>`` (worker -> coordinator, every heartbeat): liveness, progress and
      the keys accepted since the previous status.
    - ``agg/partial/<worker>`` (worker -> coordinator): the partial (edgefed.sharding.partial).

    Devices keep publishing to ``update/<device>``; workers read it through the shared
    subscription ``$share/<group>/<prefix>/<fleet>/update/+`` so the broker hands each update
    to exactly one member of the group.
    """

    topics: Topics

    @property
    def agg(self) -> str:
        return f"{self.topics.base}/agg"

    @property
    def round(self) -> str:
        return f"{self.agg}/round"

    @property
    def close(self) -> str:
        return f"{self.agg}/close"

    def amend(self, worker: str) -> str:
        return f"{self.agg}/amend/{check_name('worker id', worker)}"

    def presence(self, worker: str) -> str:
        return f"{self.agg}/presence/{check_name('worker id', worker)}"

    def status(self, worker: str) -> str:
        return f"{self.agg}/status/{check_name('worker id', worker)}"

    def partial(self, worker: str) -> str:
        return f"{self.agg}/partial/{check_name('worker id', worker)}"

    def shared_updates(self, group: str) -> str:
        return f"$share/{check_name('worker group', group)}/{self.topics.all_updates}"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """(kind, worker or None) of a topic under ``agg/``; ValueError otherwise."""
        if not topic.startswith(self.agg + "/"):
            raise ValueError(f"topic {topic!r} is not under {self.agg}/")
        parts = topic[len(self.agg) + 1 :].split("/")
        if len(parts) == 1 and parts[0] in ("round", "close"):
            return parts[0], None
        if len(parts) == 2 and parts[0] in ("amend", "presence", "status", "partial"):
            return parts[0], check_name("worker id", parts[1])
        raise ValueError(f"unknown topic {topic!r}")
