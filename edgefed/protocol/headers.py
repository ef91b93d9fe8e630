"""The typed headers of edgefed's messages, each with ONE parser.

- :class:`TaskHeader` (coordinator -> device, ``task/<device>``): what to train and how.
- :class:`ModelHeader` (coordinator -> device, ``task/<device>``): the run's final model.
- :class:`UpdateHeader` (device -> coordinator, ``update/<device>``): which update this is.
  It repeats round, device and sample count from the codec metadata so an update can be
  dropped (late, duplicate, not sampled) before its payload is decoded; the intake
  (``edgefed.coordinator.intake``) checks that the two agree.
- :class:`RoundAnnouncement` (coordinator -> all on ``round``; -> aggregator workers on
  ``agg/round`` with the schema and each sampled device's allowed tensors, so a worker
  checks an update exactly as the coordinator does).

Parsers raise :class:`~edgefed.protocol.framing.MessageError` whose ``reason`` names the key
and what was wrong; ``to_dict``/``to_json`` build what goes on the wire.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefed.protocol.framing import MessageError, require

_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def is_id(value: object) -> bool:
    """A device, worker or update id: 1-64 characters of ``[A-Za-z0-9_.-]``."""
    return isinstance(value, str) and bool(_ID.match(value))


def _graph_sha(header: Mapping[str, Any]) -> str:
    sha = require(header, "graph_sha", str)
    if not sha.isalnum():  # it names a directory on the device: no "../"
        raise MessageError(f"bad graph id {sha[:80]!r}")
    return sha


@dataclass(frozen=True)
class TaskHeader:
    round: int
    model_version: str
    graph_id: str
    graph_sha: str
    hyper: dict[str, Any]
    uplink: str
    schema: dict[str, list[int]]
    error_feedback: bool = True
    deadline_s: float | None = None
    run_id: str | None = None  # the coordinator's run: a device meeting a new run follows it

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "task",
            "run_id": self.run_id,
            "round": self.round,
            "model_version": self.model_version,
            "graph_id": self.graph_id,
            "graph_sha": self.graph_sha,
            "hyper": self.hyper,
            "uplink": self.uplink,
            "error_feedback": self.error_feedback,
            "schema": self.schema,
            "deadline_s": self.deadline_s,
        }

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> TaskHeader:
        if header.get("type") != "task":
            raise MessageError("not a task")
        sha = _graph_sha(header)
        ef = header.get("error_feedback", True)
        dl = header.get("deadline_s")
        return cls(
            round=require(header, "round", int),
            model_version=require(header, "model_version", str),
            graph_id=str(header.get("graph_id", "full")),
            graph_sha=sha,
            hyper=require(header, "hyper", dict),
            uplink=require(header, "uplink", str),
            schema=require(header, "schema", dict),
            error_feedback=ef if isinstance(ef, bool) else True,
            deadline_s=None if isinstance(dl, bool) or not isinstance(dl, int | float) else dl,
            run_id=rid if isinstance(rid := header.get("run_id"), str) else None,
        )


@dataclass(frozen=True)
class ModelHeader:
    """The run's final model (coordinator -> device on ``task/<device>`` after the last
    round): the device stores it as its deployed model and does not train on it."""

    round: int
    model_version: str
    graph_id: str
    graph_sha: str
    schema: dict[str, list[int]]
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "model",
            "run_id": self.run_id,
            "round": self.round,
            "model_version": self.model_version,
            "graph_id": self.graph_id,
            "graph_sha": self.graph_sha,
            "schema": self.schema,
        }

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> ModelHeader:
        if header.get("type") != "model":
            raise MessageError("not a final model")
        return cls(
            round=require(header, "round", int),
            model_version=require(header, "model_version", str),
            graph_id=str(header.get("graph_id", "full")),
            graph_sha=_graph_sha(header),
            schema=require(header, "schema", dict),
            run_id=rid if isinstance(rid := header.get("run_id"), str) else None,
        )


@dataclass(frozen=True)
class UpdateHeader:
    round: int
    device_id: str
    update_id: str
    num_samples: int = 0  # 0 only in an error report
    loss: float | None = None
    error: str | None = None  # the device could not train: why (then no update part)

    @property
    def key(self) -> tuple[str, int, str]:
        """Identity of an update: a redelivered copy has the same key."""
        return (self.device_id, self.round, self.update_id)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "round": self.round,
            "device_id": self.device_id,
            "update_id": self.update_id,
        }
        if self.error is not None:
            d["error"] = self.error
        else:
            d["num_samples"] = self.num_samples
            d["loss"] = None if self.loss is None else round(self.loss, 5)
        return d

    @classmethod
    def parse(cls, header: Mapping[str, Any]) -> UpdateHeader:
        rnd = require(header, "round", int)
        dev = require(header, "device_id", str)
        uid = require(header, "update_id", str)
        if "error" in header:
            return cls(rnd, dev, uid, error=str(header["error"])[:200])
        if not is_id(uid):
            raise MessageError("update_id must be 1-64 chars of [A-Za-z0-9_.-]")
        num = require(header, "num_samples", int)
        loss = header.get("loss")
        ok = isinstance(loss, int | float) and not isinstance(loss, bool) and loss == loss
        ok = ok and abs(loss) != float("inf")
        return cls(rnd, dev, uid, num, float(loss) if ok else None)


@dataclass(frozen=True)
class RoundAnnouncement:
    round: int
    model_version: str
    sampled: list[str]
    schema: dict[str, list[int]] | None = None  # aggregator workers only
    allowed: dict[str, list[str]] = field(default_factory=dict)  # device -> tensors it may send
    # Asynchronous buffers (aggregator workers only): device -> [task round, model version]
    # of the task it holds, and {"version", "max", "weight"}: the version the buffer folds
    # into, ``max_staleness`` and ``staleness_weight`` (docs/asynchronous.md).
    tasks: dict[str, list[int]] | None = None
    staleness: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "round": self.round,
            "model_version": self.model_version,
            "sampled": sorted(self.sampled),
        }
        if self.schema is not None:
            d["schema"] = self.schema
        if self.allowed:
            d["allowed"] = {k: sorted(v) for k, v in sorted(self.allowed.items())}
        if self.tasks is not None:
            d["tasks"] = {k: list(v) for k, v in sorted(self.tasks.items())}
            d["staleness"] = dict(self.staleness or {})
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()

    @classmethod
    def parse(cls, payload: bytes) -> RoundAnnouncement:
        try:
            msg = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise MessageError(f"round announcement is not JSON: {e}") from None
        except RecursionError:
            raise MessageError("round announcement JSON is nested too deeply") from None
        if not isinstance(msg, dict):
            raise MessageError("round announcement is not a JSON object")
        sampled = require(msg, "sampled", list)
        if not all(is_id(d) for d in sampled):
            raise MessageError("round announcement 'sampled' must list device ids")
        schema = msg.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise MessageError("round announcement 'schema' is not an object")
        allowed = msg.get("allowed", {})
        if not isinstance(allowed, dict) or not all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in allowed.values()
        ):
            raise MessageError("round announcement 'allowed' must map devices to tensor names")
        tasks, staleness = msg.get("tasks"), msg.get("staleness")
        if tasks is not None:
            if not isinstance(tasks, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 0 for x in v)
                for v in tasks.values()
            ):
                raise MessageError("round announcement 'tasks': device -> [task round, version]")
            if (
                not isinstance(staleness, dict)
                or type(staleness.get("version")) is not int
                or type(staleness.get("max")) is not int
                or not isinstance(staleness.get("weight"), str)
            ):
                raise MessageError("round announcement 'staleness' needs version, max and weight")
        return cls(
            require(msg, "round", int),
            require(msg, "model_version", str),
            list(sampled),
            schema,
            {k: list(v) for k, v in allowed.items()},
            {k: list(v) for k, v in tasks.items()} if tasks is not None else None,
            dict(staleness) if tasks is not None else None,
        )


__all__ = ["ModelHeader", "RoundAnnouncement", "TaskHeader", "UpdateHeader", "is_id"]
