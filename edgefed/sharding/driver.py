"""The coordinator's side of sharded aggregation over MQTT: worker membership, round
announcement, progress, worker loss, close, amendments and the merge.

Usage (the coordinator service keeps its own client for presence and tasks)::

    agg = ShardedAggregation(transport, schema, ShardingConfig(workers=3), resend=resend)
    agg.start(); agg.wait_for_workers()
    agg.open_round(rnd, model_version, sampled)       # BEFORE the tasks go out
    agg.pump(deadline, agg.all_reported)              # progress + liveness
    result = agg.close_round()                        # MergeResult: sums, weights, keys

Worker loss (decided, see docs/scale-out.md): mosquitto 2.0.11 does NOT hand a killed
shared-subscription member's unacknowledged updates to the other members (measured), and
newer brokers may. Correct either way: when a worker is declared dead (Last Will "offline"
with its instance id, or no status for ``heartbeat_timeout``) it is fenced (a later
partial from it is rejected) and, with ``on_worker_loss = "redeliver"``, ``resend`` is
called with every sampled device whose update no live worker has reported; the device
agent answers a repeated task with its stored update (same update id), a surviving worker
counts it, and if a copy reaches two workers the merge keeps one (exactly once). With
``"drop"`` (or no ``resend``), the round ends without those updates and reports them. A
worker lost after the close (between close and its partial) always takes its updates
with it: they are reported as dropped, the round still ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from edgefed.codec import ModelSchema
from edgefed.protocol import Drop, DropReason, RoundAnnouncement, ShardTopics, Topics
from edgefed.sharding.config import ShardingConfig
from edgefed.sharding.merge import MergeResult, PartialMerger
from edgefed.sharding.partial import Key
from edgefed.transport import TransportConfig
from edgefed.transport.client import Incoming, MqttClient

log = logging.getLogger(__name__)

__all__ = ["ShardedAggregation"]


class ShardedAggregation:
    MAX_RESENDS = 3

    def __init__(
        self,
        transport: TransportConfig,
        schema: ModelSchema,
        cfg: ShardingConfig,
        resend: Callable[[list[str]], None] | None = None,
        client_id: str = "edgefed-coordinator-agg",
    ) -> None:
        self.cfg = cfg
        self.schema = schema
        self.resend = resend
        self.topics = ShardTopics(Topics(transport.fleet, transport.topic_prefix))
        a = self.topics.agg
        self.client = MqttClient(
            transport,
            client_id,
            subscriptions=[f"{a}/presence/+", f"{a}/status/+", f"{a}/partial/+"],
        )
        self.live: dict[str, str] = {}  # worker -> instance
        self.last_seen: dict[str, float] = {}
        self.dead_instances: set[tuple[str, str]] = set()
        self.reported: dict[str, dict[str, Key]] = {}  # worker -> device -> key (this round)
        self.round: int | None = None
        self.sampled: frozenset[str] = frozenset()
        self.merger: PartialMerger | None = None
        self.lost: dict[str, str] = {}  # device -> reason (this round)
        self.worker_drops: list[Drop] = []  # updates the workers refused (this round)
        self.resent: dict[str, int] = {}  # device -> re-send requests this round
        self._last_resend = 0.0
        self._last_pump = 0.0
        self.rejected_messages = 0
        self.worker_round: dict[str, int | None] = {}  # last round each worker reported
        self._closing = False
        self.buffer = False  # the open round is an asynchronous buffer (keys: task rounds)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float | None = 30.0) -> ShardedAggregation:
        self.client.start(timeout)
        return self

    def stop(self) -> None:
        self.client.stop()

    def wait_for_workers(self, n: int | None = None, timeout: float | None = None) -> int:
        """Block until ``n`` (default: the configured number) workers are live."""
        n = self.cfg.workers if n is None else n
        until = time.monotonic() + (self.cfg.worker_wait if timeout is None else timeout)
        self.pump(until, lambda: len(self.live) >= n)
        if len(self.live) < n:
            raise TimeoutError(f"only {len(self.live)} of {n} aggregator workers are live")
        return len(self.live)

    # ---- inbox -----------------------------------------------------------------------
    def pump(self, until: float, done: Callable[[], bool] = lambda: False) -> None:
        """Handle messages until ``done()`` or ``until``. Liveness is judged only while we
        listen and only with the inbox drained: a coordinator busy elsewhere (evaluating,
        checkpointing) must not read its own deafness as silent workers."""
        now = time.monotonic()
        if now - self._last_pump > 0.5:
            for w in self.live:
                self.last_seen[w] = max(self.last_seen.get(w, now), now)
        while not done() and time.monotonic() < until:
            m = self.client.get(timeout=min(0.05, max(0.0, until - time.monotonic())))
            if m is not None:
                try:
                    self.handle(m)
                except Exception:
                    log.exception("error handling %s", m.topic)
                    self.rejected_messages += 1
            if self.client.inbox.empty():
                self.check_liveness()
                self.resend_again()
            self._last_pump = time.monotonic()
        self._last_pump = time.monotonic()

    def handle(self, m: Incoming) -> None:
        try:
            kind, worker = self.topics.parse(m.topic)
        except ValueError as e:
            log.warning("ignored %s: %s", m.topic, e)
            self.rejected_messages += 1
            return
        assert worker is not None or kind in ("round", "close")
        if kind == "partial" and worker is not None:
            self._on_partial(worker, m.payload)
            return
        try:
            msg = json.loads(m.payload)
            if not isinstance(msg, dict) or not isinstance(msg.get("instance"), str):
                raise ValueError("needs an instance id")
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("invalid %s message from %s: %s", kind, worker, e)
            self.rejected_messages += 1
            return
        if kind == "presence" and worker is not None:
            self._on_presence(worker, msg)
        elif kind == "status" and worker is not None:
            self._on_status(worker, msg)

    def _on_presence(self, worker: str, msg: dict) -> None:
        inst = msg["instance"]
        if msg.get("status") == "offline":
            if self.live.get(worker) == inst:
                self._lost(worker, "Last Will: worker went offline")
            return
        if msg.get("status") != "online" or (worker, inst) in self.dead_instances:
            return
        if self.live.get(worker) not in (None, inst):
            self._lost(worker, "replaced by a new instance")
        if worker not in self.live:
            log.info("aggregator %s online (instance %s)", worker, inst)
        self.live[worker] = inst
        self.last_seen[worker] = time.monotonic()
        if self.merger is not None:
            self.merger.set_live(worker, inst)

    def _on_status(self, worker: str, msg: dict) -> None:
        inst = msg["instance"]
        if (worker, inst) in self.dead_instances:
            return
        if worker not in self.live:  # status before the retained presence: still alive
            self._on_presence(worker, {"status": "online", "instance": inst})
        if self.live.get(worker) != inst:
            return
        self.last_seen[worker] = time.monotonic()
        rnd = msg.get("round")
        self.worker_round[worker] = rnd if isinstance(rnd, int) else None
        keys = msg.get("new_keys")
        if msg.get("round") != self.round or not isinstance(keys, list):
            return
        self._take_drops(msg.get("drops"))
        rep = self.reported.setdefault(worker, {})
        for k in keys:
            if (
                isinstance(k, list)
                and len(k) == 3
                and isinstance(k[0], str)
                and (k[1] == self.round or (self.buffer and type(k[1]) is int))
                and isinstance(k[2], str)
            ):
                rep[k[0]] = (k[0], k[1], k[2])

    def _take_drops(self, drops: object) -> None:
        """The updates a worker refused, with their reasons, for the round's metrics."""
        if not isinstance(drops, list):
            return
        for d in drops:
            try:
                dev, cat, detail = d
                self.worker_drops.append(Drop(str(dev)[:64], DropReason(cat), str(detail)[:300]))
            except (TypeError, ValueError):
                self.rejected_messages += 1

    def _on_partial(self, worker: str, payload: bytes) -> None:
        if self.merger is None:
            log.warning("partial from %s while no round is closing: ignored", worker)
            self.rejected_messages += 1
            return
        p = self.merger.add(worker, payload)
        if p is not None:
            self.last_seen[worker] = time.monotonic()
            self.reported[worker] = {k[0]: k for k in p.keys}

    # ---- liveness --------------------------------------------------------------------
    def check_liveness(self) -> None:
        now = time.monotonic()
        for w in list(self.live):
            if now - self.last_seen.get(w, now) > self.cfg.heartbeat_timeout:
                self._lost(w, f"no status for {self.cfg.heartbeat_timeout:.1f}s")

    def _lost(self, worker: str, reason: str) -> None:
        inst = self.live.pop(worker)
        self.dead_instances.add((worker, inst))
        log.warning("aggregator %s (instance %s) lost: %s", worker, inst, reason)
        if self.round is not None:  # if it is alive after all, it must stop counting as inst
            fence = {"round": self.round, "instance": inst, "fence": True}
            self.client.publish(self.topics.amend(worker), json.dumps(fence).encode(), timeout=5)
        gone = self.reported.pop(worker, {})
        if self.merger is not None:
            for k in self.merger.declare_dead(worker, f"worker lost: {reason}"):
                gone[k[0]] = k
        if self.round is None:
            return
        for dev in gone:
            self.lost[dev] = f"worker {worker} lost ({reason}) holding this update"
        if self._closing or self.cfg.on_worker_loss == "drop" or self.resend is None:
            return
        missing = sorted(self.sampled - self.reported_devices())
        if missing:
            log.info(
                "round %d: asking %d devices to re-send their update", self.round, len(missing)
            )
            self._resend(missing)

    def _resend(self, devices: list[str]) -> None:
        assert self.resend is not None
        for d in devices:
            self.resent[d] = self.resent.get(d, 0) + 1
        self._last_resend = time.monotonic()
        self.resend(devices)

    def resend_again(self) -> None:
        """A re-sent update can land on a worker that is hung but still connected (the broker
        keeps it in the group until its keepalive expires): ask again, every
        ``heartbeat_timeout``, the devices already asked once whose update is still not
        reported, at most ``MAX_RESENDS`` times per device and round."""
        if self.resend is None or self._closing or self.round is None or not self.resent:
            return
        if time.monotonic() - self._last_resend < self.cfg.heartbeat_timeout:
            return
        have = self.reported_devices()
        again = sorted(d for d, n in self.resent.items() if d not in have and n < self.MAX_RESENDS)
        if again:
            log.info("round %d: asking %d devices again", self.round, len(again))
            self._resend(again)

    # ---- rounds ----------------------------------------------------------------------
    def workers_at(self, rnd: int) -> bool:
        """Every live worker has reported round ``rnd`` open. Updates for a round LOWER than a
        worker's current one count as late, so after re-announcing an earlier round (a
        coordinator restarted without its checkpoint) wait for this before sending tasks."""
        return bool(self.live) and all(self.worker_round.get(w) == rnd for w in self.live)

    def reported_devices(self) -> set[str]:
        return {d for w in self.live for d in self.reported.get(w, {})}

    def all_reported(self) -> bool:
        """Every sampled device's update has been reported by a live worker."""
        return bool(self.sampled) and self.sampled <= self.reported_devices()

    def open_round(
        self,
        rnd: int,
        model_version: str,
        sampled: list[str],
        allowed: dict[str, list[str]] | None = None,
    ) -> None:
        """Announce the round to the workers (retained: a worker joining later gets it).
        ``allowed``: device -> the tensors its graph updates (default: every tensor)."""
        self.announce(
            RoundAnnouncement(
                rnd,
                model_version,
                sorted(sampled),
                {k: list(v) for k, v in self.schema.items()},
                dict(allowed or {}),
            )
        )

    def announce(self, ann: RoundAnnouncement) -> None:
        """Announce a round built by the coordinator's engine (schema and allowed tensors)."""
        rnd, sampled = ann.round, ann.sampled
        self.buffer = ann.tasks is not None
        self.round = rnd
        self.sampled = frozenset(sampled)
        self.reported = {}
        self.lost = {}
        self.resent = {}
        self.merger = None
        self.worker_drops = []
        self._closing = False
        self.client.publish(self.topics.round, ann.to_json(), retain=True)

    def close_round(self, timeout: float | None = None) -> MergeResult:
        """Close the open round: collect a partial from every live worker, resolve devices
        counted twice, merge. Workers lost meanwhile are written off (module doc)."""
        if self.round is None:
            raise RuntimeError("no open round")
        rnd = self.round
        self._closing = True
        merger = self.merger = PartialMerger(self.schema, rnd, self.cfg.max_keys, self.buffer)
        for w, inst in self.live.items():
            merger.set_live(w, inst)
        for wi in self.dead_instances:
            merger.dead.add(wi)
        until = time.monotonic() + (self.cfg.close_timeout if timeout is None else timeout)
        self.client.publish(self.topics.close, json.dumps({"round": rnd}).encode())

        def have_all() -> bool:
            return set(self.live) <= set(merger.partials)

        self.pump(until, have_all)
        for w in sorted(set(self.live) - set(merger.partials)):
            self._lost(w, "no partial before the close timeout")
        conflicts = merger.conflicts()
        if conflicts:
            log.warning("round %d: devices counted by two workers: %s", rnd, conflicts)
            want = {w: merger.partials[w].amendment + 1 for w in conflicts}
            for w, devs in conflicts.items():
                msg = {"round": rnd, "instance": merger.partials[w].instance, "exclude": devs}
                self.client.publish(self.topics.amend(w), json.dumps(msg).encode())

            def amended() -> bool:
                return all(
                    w not in merger.partials or merger.partials[w].amendment >= a
                    for w, a in want.items()
                )

            self.pump(until, amended)
            for w, a in want.items():
                if w in merger.partials and merger.partials[w].amendment < a:
                    self._lost(w, "conflicting partial not re-issued in time")
            merger.reject_conflicting()
        for dev, reason in self.lost.items():
            merger.dropped.setdefault(dev, Drop(dev, DropReason.WORKER_LOST, reason))
        res = merger.merge()
        res.conflicts = conflicts
        res.worker_drops = list(self.worker_drops)
        for dev in set() if self.buffer else self.sampled - {k[0] for k in res.keys}:
            res.dropped.setdefault(  # (a buffer's devices without an update keep their task)
                dev, Drop(dev, DropReason.DEADLINE, "no update counted before the round closed")
            )
        self.round = None
        self.merger = None
        self._closing = False
        return res
