"""Topics of sharded aggregation, under the fleet's base (``<prefix>/<fleet>/agg/...``).

- ``agg/round`` (coordinator -> workers, QoS 1, retained): the open round: number, model
  version, schema, sampled devices. Retained so a worker that (re)starts mid-round joins it.
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

from __future__ import annotations

from dataclasses import dataclass

from edgefed.transport import Topics, check_name


@dataclass(frozen=True)
class ShardTopics:
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
