"""The aggregator worker: a stateless process that sums its share of a round's updates.

Workers of one group share the update stream through an MQTT 5 shared subscription, so
the broker hands each update to one of them. A worker checks every update with the
coordinator's own intake (:func:`edgefed.coordinator.intake.accept`: the round announcement
carries each sampled device's allowed tensors, so a head-only device's full-model update is
refused here too) and adds it to a codec :class:`~edgefed.codec.Accumulator` straight from
its compressed form (weight = the device's sample count: FedAvg weighting). An invalid
update is dropped with its reason logged and reported to the coordinator in the next
status message, which counts it in the round's metrics. When the coordinator closes the
round, the worker publishes its partial
(:mod:`.partial`); if the coordinator finds a device counted by two workers (a device
re-sent its update and the copies reached different workers) it asks all but one to
re-issue the partial without it, which the worker does by re-adding its retained
updates minus the excluded ones.

Asynchronous buffers (FedBuff with ``[sharding]``, docs/asynchronous.md): the announcement
also carries every task out (device -> task round, model version) and the staleness rule;
the intake checks each update against its device's task, a ``stale`` one is dropped and
reported, the others are added with ``scale = w(staleness)`` (kept, so an amendment or a
re-fence re-adds them with the same scale). Keys then name task rounds.

"Stateless": the only state is the open round's sums, rebuilt from nothing when a new
worker joins; a worker that crashes loses only the updates it held, which the
coordinator handles (see :mod:`.merge`). The worker publishes a status message every
``heartbeat_interval`` (liveness and the keys it accepted since the last one, so the
coordinator knows which devices' updates a dead worker took with it) and has a Last Will.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgefed.codec import Accumulator, CodecError, ModelSchema, decode_update
from edgefed.coordinator.intake import HeldTask, RoundContext, accept
from edgefed.coordinator.staleness import parse_staleness_weight
from edgefed.protocol import Drop, DropReason, MessageError, RoundAnnouncement, ShardTopics, Topics
from edgefed.sharding.config import WorkerConfig
from edgefed.sharding.partial import Key, Partial, encode_partial
from edgefed.transport.client import Incoming, MqttClient

log = logging.getLogger(__name__)

_NO_SCHEMA = ModelSchema({})
MAX_REPORTED_DROPS = 200  # per status message: the rest are only counted


@dataclass
class _Round:
    round: int
    model_version: str
    schema: ModelSchema
    sampled: frozenset[str]
    acc: Accumulator
    allowed: dict[str, frozenset[str]] = field(default_factory=dict)  # device -> tensors
    keys: dict[str, Key] = field(default_factory=dict)  # device -> key, in arrival order
    weights: dict[str, float] = field(default_factory=dict)
    kept: dict[str, bytes] | None = field(default_factory=dict)  # device -> update bytes
    kept_bytes: int = 0
    weight_total: float = 0.0
    rejected: int = 0
    closed: bool = False
    amendment: int = 0
    excluded: set[str] = field(default_factory=set)
    # asynchronous buffer: device -> the task it holds; each update's staleness scale
    tasks: dict[str, HeldTask] | None = None
    scales: dict[str, float] = field(default_factory=dict)
    version: int = 0  # the model version this buffer folds into
    max_staleness: int = 0
    weight: Any = None  # staleness -> scale (coordinator/staleness.py)
    origin: tuple[str, str] = ("", "")  # (run id, coordinator process) that announced it


def _origin(ann: RoundAnnouncement) -> tuple[str, str]:
    """Who announced an asynchronous buffer: the coordinator's run id and process instance
    (``sharding.collector`` adds them to the buffer's parameters); ("", "") otherwise."""
    p = ann.staleness or {}
    return str(p.get("run", "")), str(p.get("coordinator", ""))


def _task_map(ann: RoundAnnouncement, allowed: dict[str, frozenset[str]]) -> dict[str, HeldTask]:
    """An asynchronous buffer's tasks: device -> the task it holds (round, version)."""
    every = frozenset(ann.schema or {})
    return {d: HeldTask(r, v, "", allowed.get(d, every)) for d, (r, v) in (ann.tasks or {}).items()}


class AggregatorWorker:
    def __init__(self, cfg: WorkerConfig, instance: str | None = None) -> None:
        self.cfg = cfg
        self.instance = instance or secrets.token_hex(8)
        t = cfg.transport
        self.topics = ShardTopics(Topics(t.fleet, t.topic_prefix))
        wid = cfg.worker_id
        offline = json.dumps({"status": "offline", "worker": wid, "instance": self.instance})
        self.client = MqttClient(
            t,
            f"edgefed-agg-{wid}",
            subscriptions=[
                self.topics.round,
                self.topics.close,
                self.topics.amend(wid),
                self.topics.shared_updates(cfg.group),
            ],
            will=(self.topics.presence(wid), offline.encode()),
        )
        self.state: _Round | None = None
        self.pending: list[Incoming] = []  # updates for a round not announced yet
        self.new_keys: list[Key] = []
        self.accepted_total = 0
        self.rejected_total = 0
        self.drops: list[tuple[str, str]] = []  # (device, reason), recent, for tests/logs
        self.new_drops: list[Drop] = []  # this round's, not yet reported in a status
        self._stop = threading.Event()
        self._last_status = 0.0

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float | None = 30.0) -> AggregatorWorker:
        self.client.start(timeout)
        online = {
            "status": "online",
            "worker": self.cfg.worker_id,
            "instance": self.instance,
            "group": self.cfg.group,
        }
        self.client.publish(
            self.topics.presence(self.cfg.worker_id), json.dumps(online).encode(), retain=True
        )
        return self

    def run(self) -> None:
        """Serve until :meth:`stop`; one message at a time, status every heartbeat."""
        while not self._stop.is_set():
            m = self.client.get(timeout=min(0.1, self.cfg.heartbeat_interval))
            if m is not None:
                try:
                    self.handle(m)
                except Exception:  # one bad message must never end the worker
                    log.exception("%s: error handling %s", self.cfg.worker_id, m.topic)
            now = time.monotonic()
            if now - self._last_status >= self.cfg.heartbeat_interval:
                self._last_status = now
                self.publish_status()

    def stop(self) -> None:
        """Clean shutdown: mark offline (retained) and disconnect."""
        self._stop.set()
        off = {"status": "offline", "worker": self.cfg.worker_id, "instance": self.instance}
        with contextlib.suppress(OSError, TimeoutError):
            self.client.publish(
                self.topics.presence(self.cfg.worker_id), json.dumps(off).encode(), retain=True
            )
        self.client.stop()

    # ---- dispatch --------------------------------------------------------------------
    def handle(self, m: Incoming) -> None:
        if m.topic.startswith(self.topics.agg + "/"):
            kind, _ = self.topics.parse(m.topic)
            if kind == "round":
                self._on_round(m.payload)
            elif kind == "close":
                self._on_close(m.payload)
            elif kind == "amend":
                self._on_amend(m.payload)
            return
        try:
            kind, device = self.topics.topics.parse(m.topic)
        except ValueError as e:
            log.warning("%s: ignored message on %s: %s", self.cfg.worker_id, m.topic, e)
            return
        if kind == "update" and device is not None:
            self.handle_update(device, m)

    def _control(self, payload: bytes, what: str) -> dict | None:
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict) or type(msg.get("round")) is not int:
                raise ValueError("needs an integer round")
            return msg
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("%s: invalid %s message: %s", self.cfg.worker_id, what, e)
            return None

    def _on_round(self, payload: bytes) -> None:
        try:
            ann = RoundAnnouncement.parse(payload)
            if ann.schema is None:
                raise MessageError("round announcement lacks the schema")
            old = self.state.schema if self.state else None
            schema = ModelSchema(ann.schema)
            if old is not None and old.to_json() == schema.to_json():
                schema = old
        except (MessageError, CodecError, ValueError, TypeError) as e:
            log.warning("%s: invalid round announcement: %s", self.cfg.worker_id, e)
            return
        rnd, version, sampled = ann.round, ann.model_version, frozenset(ann.sampled)
        st = self.state
        origin = _origin(ann)
        if (
            st is not None and (rnd, version, sampled) == (st.round, st.model_version, st.sampled)
            and origin == st.origin
        ):  # fmt: skip
            return  # the retained copy of the round we already have
        every = frozenset(schema)  # an announcement without "allowed": any model tensor
        allowed = {d: frozenset(ann.allowed.get(d, every)) for d in sampled}
        if (
            st is not None and st.tasks is not None and ann.tasks is not None
            and (rnd, version) == (st.round, st.model_version)
            and origin[0] == st.origin[0] and (origin != st.origin or not st.closed)
        ):  # fmt: skip
            self._reannounced(st, ann, sampled, allowed, origin)
            return
        if st is not None and rnd <= st.round:
            # The coordinator is authoritative: it restarted without its checkpoint, or a
            # new coordinator took over. Follow it rather than calling its updates late.
            log.warning("%s: round %d announced after round %d", self.cfg.worker_id, rnd, st.round)
        self.state = _Round(rnd, version, schema, sampled, self._new_acc(schema), allowed)
        self.state.origin = origin
        if ann.tasks is not None and ann.staleness is not None:  # an asynchronous buffer
            try:
                weight = parse_staleness_weight(ann.staleness["weight"])
            except ValueError as e:
                log.warning("%s: invalid buffer announcement: %s", self.cfg.worker_id, e)
                self.state = None
                return
            st = self.state
            st.version, st.max_staleness = ann.staleness["version"], ann.staleness["max"]
            st.weight = weight
            st.tasks = _task_map(ann, allowed)
        self.new_keys = []
        self.new_drops = []
        log.info("%s: round %d open (%d devices)", self.cfg.worker_id, rnd, len(sampled))
        self._handle_pending()

    def _reannounced(
        self,
        st: _Round,
        ann: RoundAnnouncement,
        sampled: frozenset[str],
        allowed: dict[str, frozenset[str]],
        origin: tuple[str, str],
    ) -> None:
        """The buffer this worker holds, announced again by a coordinator of the same run.

        By a restarted coordinator process (another ``origin``): it lost the buffer with
        its process -- it had not checkpointed the version this buffer makes, or it would
        announce the next one -- and restored the tasks it had out, plus new ones. The
        updates summed here answered tasks of this run that it never recorded as answered,
        so they are kept, and counted once: the restarted coordinator merges them in this
        buffer's partial. That holds even when the old coordinator had already closed the
        buffer here (this worker sent its partial) and died before its checkpoint: the
        buffer reopens. Its next partial carries a higher amendment number, so a copy of
        the old partial the broker still delivers to the new coordinator (persistent
        session) can never be merged in its place. The new coordinator knows none of the
        keys held: all are reported again in the next status (its buffer fills from them).

        By the same coordinator process (same ``origin``, buffer still open): another task
        map for the open buffer; the sums stay, as always."""
        restarted = origin != st.origin
        if st.closed:
            st.closed = False
            st.amendment += 1
        st.sampled, st.allowed, st.tasks = sampled, allowed, _task_map(ann, allowed)
        st.origin = origin
        if restarted:
            self.new_keys = [k for d, k in st.keys.items() if d not in st.excluded]
        log.info(
            "%s: buffer %d re-announced%s (%d tasks out, %d updates kept)", self.cfg.worker_id,
            st.round, " by a restarted coordinator" if restarted else "", len(st.tasks),
            len(st.keys) - len(st.excluded),
        )  # fmt: skip
        self._handle_pending()

    def _handle_pending(self) -> None:
        """Updates held until their round (or their task) was announced."""
        held, self.pending = self.pending, []
        for m in held:
            self.handle(m)

    def _new_acc(self, schema: ModelSchema) -> Accumulator:
        return Accumulator(schema, threads=self.cfg.threads)

    # ---- updates ---------------------------------------------------------------------
    def _drop(self, drop: Drop) -> bool:
        log.warning("%s: dropped update from %s: %s", self.cfg.worker_id, drop.device, drop.text)
        self.drops.append((drop.device, drop.text))
        del self.drops[:-1000]
        self.rejected_total += 1
        if self.state is not None:
            self.state.rejected += 1
            self.new_drops.append(drop)
        return False

    def _context(self) -> RoundContext:
        st = self.state
        if st is None:
            return RoundContext(None, "", _NO_SCHEMA, {})
        return RoundContext(
            st.round, st.model_version, st.schema, st.allowed, st.keys, closed=st.closed,
            tasks=st.tasks,
        )  # fmt: skip

    def handle_update(self, topic_device: str, m: Incoming) -> bool:
        """Check one update with the coordinator's intake and add it to the open round's
        sums; False if dropped (or held until its round is announced)."""
        res = accept(topic_device, m.payload, self._context())
        if isinstance(res, Drop):
            if res.retry:
                if len(self.pending) < self.cfg.max_pending:
                    self.pending.append(m)  # announced soon: the round message may be behind
                    return False
                return self._drop(Drop(res.device, DropReason.INVALID, "update for unknown round"))
            if res.redelivery:
                log.info("%s: duplicate of %s's update ignored", self.cfg.worker_id, res.device)
                return False
            return self._drop(res)
        st = self.state
        assert st is not None
        dev, num = res.device, float(res.num_samples)
        scale = 1.0
        if st.tasks is not None:  # async: the staleness weight, applied where it is decoded
            stale = st.version - st.tasks[dev].version
            if stale > st.max_staleness:
                why = f"{stale} versions behind (max_staleness {st.max_staleness})"
                return self._drop(Drop(dev, DropReason.STALE, why))
            scale = float(st.weight(stale))
        try:
            st.acc.add(res.update, num, scale)
        except CodecError as e:
            return self._drop(Drop(dev, DropReason.INVALID, e.reason))
        key: Key = res.key
        st.keys[dev] = key
        st.weights[dev] = num
        st.scales[dev] = scale
        st.weight_total += num
        if st.kept is not None:
            st.kept_bytes += res.payload_bytes
            if st.kept_bytes <= self.cfg.retain_bytes:
                st.kept[dev] = res.payload
            else:  # past the memory budget: a conflicting partial can no longer be re-issued
                log.warning("%s: retain_bytes exceeded; partial not amendable", self.cfg.worker_id)
                st.kept = None
        self.new_keys.append(key)
        self.accepted_total += 1
        return True

    # ---- close / amend ---------------------------------------------------------------
    def partial(self) -> Partial:
        st = self.state
        if st is None:
            raise RuntimeError("no round")
        keys = [k for d, k in st.keys.items() if d not in st.excluded]
        sums, weights = st.acc.result() if keys else ({}, {})
        return Partial(
            st.round,
            self.cfg.worker_id,
            self.instance,
            st.schema.digest(),
            keys,
            sum(st.weights[k[0]] for k in keys),
            st.rejected,
            st.amendment,
            {k: v.reshape(-1) for k, v in sums.items()},
            {k: v.reshape(-1) for k, v in weights.items()},
        )

    def _publish_partial(self) -> None:
        p = self.partial()
        data = encode_partial(p)
        self.client.publish(self.topics.partial(self.cfg.worker_id), data)
        log.info(
            "%s: round %d partial #%d: %d updates, %d bytes",
            self.cfg.worker_id, p.round, p.amendment, p.count, len(data),
        )  # fmt: skip

    def _on_close(self, payload: bytes) -> None:
        msg = self._control(payload, "close")
        st = self.state
        if msg is None or st is None or msg["round"] != st.round:
            if msg is not None:
                log.warning("%s: close of round %s not open here", self.cfg.worker_id, msg["round"])
            return
        st.closed = True
        self.publish_status()  # last keys first, then the partial
        self._publish_partial()

    def _on_amend(self, payload: bytes) -> None:
        msg = self._control(payload, "amend")
        st = self.state
        if msg is None or st is None or msg["round"] != st.round:
            return
        if not st.closed and msg.get("fence") is not True:
            return
        if msg.get("instance") != self.instance:
            log.warning("%s: amend addressed to another instance ignored", self.cfg.worker_id)
            return
        if msg.get("fence") is True:
            self._refence(st)
            return
        excl = msg.get("exclude")
        if not isinstance(excl, list) or not all(isinstance(d, str) for d in excl):
            log.warning("%s: invalid amend message", self.cfg.worker_id)
            return
        if st.kept is None:
            log.error("%s: cannot amend: updates were not retained", self.cfg.worker_id)
            return
        st.excluded |= set(excl) & set(st.keys)
        acc = self._new_acc(st.schema)
        for dev in st.keys:  # same order as the first time, minus the excluded devices
            if dev not in st.excluded:
                acc.add(
                    decode_update(st.kept[dev], st.schema, accept_v1=True),
                    st.weights[dev],
                    st.scales.get(dev, 1.0),
                )
        st.acc = acc
        st.amendment += 1
        self._publish_partial()

    def _refence(self, st: _Round) -> None:
        """The coordinator wrote this instance off (it looked dead, e.g. it hung): nothing it
        sent as that instance will be merged, and its devices were asked to re-send. Rejoin
        as a new instance; the updates it still holds are counted again under the new one
        (a copy re-sent by the device to another worker is resolved at the merge), so a
        worker that comes back loses nothing."""
        log.error("%s: fenced by the coordinator; rejoining as a new instance", self.cfg.worker_id)
        self.instance = secrets.token_hex(8)
        new = _Round(
            st.round, st.model_version, st.schema, st.sampled, self._new_acc(st.schema), st.allowed,
            tasks=st.tasks, version=st.version, max_staleness=st.max_staleness, weight=st.weight,
        )  # fmt: skip
        new.closed, new.origin = st.closed, st.origin
        new.rejected = st.rejected
        self.new_keys = []
        if st.kept is not None and not st.closed:
            for dev, key in st.keys.items():
                if dev in st.excluded:
                    continue
                new.acc.add(
                    decode_update(st.kept[dev], st.schema, accept_v1=True),
                    st.weights[dev],
                    st.scales.get(dev, 1.0),
                )
                new.keys[dev], new.weights[dev] = key, st.weights[dev]
                new.scales[dev] = st.scales.get(dev, 1.0)
                new.kept[dev] = st.kept[dev]  # type: ignore[index]
                new.kept_bytes += len(st.kept[dev])
                new.weight_total += st.weights[dev]
                self.new_keys.append(key)
        self.state = new
        online = {"status": "online", "worker": self.cfg.worker_id, "instance": self.instance,
                  "group": self.cfg.group}  # fmt: skip
        self.client.publish(
            self.topics.presence(self.cfg.worker_id), json.dumps(online).encode(), retain=True
        )

    # ---- status ----------------------------------------------------------------------
    def publish_status(self) -> None:
        st = self.state
        msg = {
            "worker": self.cfg.worker_id,
            "instance": self.instance,
            "round": st.round if st else None,
            "accepted": len(st.keys) if st else 0,
            "rejected": st.rejected if st else 0,
            "new_keys": [list(k) for k in self.new_keys],
            "drops": [
                [d.device, d.reason.value, d.detail] for d in self.new_drops[:MAX_REPORTED_DROPS]
            ],
        }
        self.new_keys = []
        self.new_drops = []
        try:
            self.client.publish(
                self.topics.status(self.cfg.worker_id), json.dumps(msg).encode(), timeout=5.0
            )
        except (OSError, TimeoutError) as e:
            log.warning("%s: status not sent: %s", self.cfg.worker_id, e)
