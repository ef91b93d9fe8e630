"""The round logic of the coordinator, independent of the transport: a thin conductor over
the fleet (:class:`DeviceStats`), the tasks, the intake (:mod:`.intake`) and aggregation
(:mod:`.aggregation`).

The one round loop (:mod:`.loop`, used by the MQTT service, the simulation and sharded
runs) drives it: :meth:`RoundEngine.start_round` returns the task bytes for each sampled
device, :meth:`RoundEngine.handle_update` takes an update's bytes and accepts it or records
why it was dropped, :meth:`RoundEngine.finish_round` aggregates (or takes the aggregator
workers' merged sums), evaluates, advances the model and returns the round's metrics.

Idempotence: an update is identified by (device, round, update id). A redelivered copy,
a second update from the same device in a round, an update for another round (late) or
from a device not sampled is dropped with its reason; nothing is counted twice. Updates
are validated one at a time on arrival, so a malformed one never reaches aggregation.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgefed.codec import CompressionSpec, ModelSchema
from edgefed.coordinator.adaptive import AUTO, DEFAULT_LADDER, AdaptiveUplink
from edgefed.coordinator.aggregation import Aggregator, make_aggregator
from edgefed.coordinator.checkpoint import Checkpoint
from edgefed.coordinator.intake import AcceptedUpdate, HeldTask, RoundContext, accept
from edgefed.coordinator.journal import Journal, crash_point, decode_update
from edgefed.coordinator.metrics import RoundMetrics
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.staleness import parse_staleness_weight
from edgefed.coordinator.tasks import LazyTasks, build_tasks
from edgefed.protocol import Drop, DropReason, RoundAnnouncement
from edgefed.strategies import Strategy
from edgefed.transport.dedupe import SeenSet

log = logging.getLogger(__name__)


@dataclass
class RoundConfig:
    min_devices: int = 2  # wait for at least this many online devices before a round
    fraction: float = 1.0  # of online devices sampled per round
    min_sampled: int = 1
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    uplink: str = "int8"  # compression spec devices use for their updates
    downlink: str = "int8"  # spec for the global weights sent with each task
    error_feedback: bool = True
    round_timeout: float = 60.0  # deadline for updates after the tasks went out
    weak_ram_mb: int = 0  # devices reporting less RAM get the head-only graph (0: never)
    weak_cores: int = 0  # ...or fewer cores
    seed: int = 0
    # Asynchronous buffered aggregation (FedBuff; docs/asynchronous.md): "sync" rounds, or
    # "async": a new model version every ``buffer_size`` accepted updates.
    mode: str = "sync"
    buffer_size: int = 10  # K: accepted updates per model version (async)
    max_staleness: int = 10  # updates trained on an older version are dropped ("stale")
    max_concurrent: int = 0  # tasks out at once (async; 0: every online device)
    staleness_weight: str = "poly:0.5"  # see coordinator/staleness.py
    # Adaptive per-device uplink (coordinator/adaptive.py): 0 = every device uses ``uplink``;
    # "auto" = (budget_ratio - 1) x the median recent round time (sync rounds only)
    upload_budget_s: float | str = 0.0
    budget_ratio: float = 1.5
    ladder: list[str] = field(default_factory=lambda: list(DEFAULT_LADDER))


@dataclass
class DeviceStats:
    graphs: list[str] = field(default_factory=list)  # graph shas the device holds
    capabilities: dict[str, Any] = field(default_factory=dict)
    sampled: int = 0
    accepted: int = 0
    dropped: int = 0
    bytes_up: int = 0
    last_round: int = 0  # the last task round the device reported (presence)


class RoundEngine:
    def __init__(
        self,
        model: FederatedModel,
        strategy: Strategy,
        config: RoundConfig,
        evaluate: Any = None,  # callable(params) -> (accuracy, loss) or None
        threads: int = 0,  # aggregation threads (0: the accumulator decides)
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.cfg = config
        self.evaluate = evaluate
        self.threads = threads
        self.params = {k: v.copy() for k, v in model.initial.items()}
        self.schema = ModelSchema(model.shapes)
        self.round = 0  # finished rounds
        self.devices: dict[str, DeviceStats] = {}
        self.rng = random.Random(config.seed)
        self.history: list[dict[str, Any]] = []
        self.cum_up = 0
        self.cum_down = 0
        self.seen = SeenSet(1_000_000)
        self.run_id = secrets.token_hex(8)  # new at a fresh start, restored from a checkpoint
        self._open: int | None = None
        self._sampled: dict[str, str] = {}  # device -> graph id
        self._ctx: RoundContext | None = None
        self._answered: dict[str, tuple[str, int, str]] = {}  # device -> counted key
        self._records: dict[tuple[str, int, str], tuple[int, float | None]] = {}  # key -> (n, loss)
        self.aggregator: Aggregator | None = None  # the open round's
        self._drops: list[Drop] = []
        self._declined: set[str] = set()  # sampled devices that refused the open round
        self._bytes_up = 0
        self._payload_up = 0
        self._bytes_down = 0
        self._started = 0.0
        for spec in (config.uplink, config.downlink):
            CompressionSpec.parse(spec)  # fail at start-up, not in round 1
        if config.mode not in ("sync", "async"):
            found = config.mode
            raise ValueError(f'[coordinator] mode: expected "sync" or "async", found {found!r}')
        self.asynchronous = config.mode == "async"
        self.staleness_weight = parse_staleness_weight(config.staleness_weight)
        self._out: dict[str, HeldTask] = {}  # async: device -> the task it holds
        # async: the write-ahead journal of the open buffer (coordinator/journal.py)
        self.journal: Journal | None = None
        self.task_seq = 0  # async: the round field of the last dispatched tasks
        # async, after a restart: the journaled tasks to send again (see _rebuild_journaled)
        self._resend = LazyTasks({})
        self._resent: dict[str, int] = {}  # sharded: device -> task round sent again
        self._copies: set[str] = set()  # sharded: ...whose update was counted since
        self._staleness: list[int] = []
        if config.upload_budget_s == AUTO and self.asynchronous:
            raise ValueError(
                '[compression] upload_budget_s: "auto" needs [coordinator] mode = "sync" (it '
                'follows the round time; async has no rounds), found mode = "async"'
            )
        self.adaptive: AdaptiveUplink | None = None
        if config.upload_budget_s not in (0, 0.0):
            ratio = config.budget_ratio
            self.adaptive = AdaptiveUplink(
                model.shapes, config.upload_budget_s, config.ladder, budget_ratio=ratio
            )
        self._budget: float | None = None  # the upload budget the open round's tasks used
        self._specs: dict[str, str] = {}  # device -> uplink spec of its latest task
        self._dev_bytes: Counter[str] = Counter()  # device -> update bytes this round

    @property
    def model_version(self) -> str:
        return f"r{self.round}"

    @property
    def downlink_seq(self) -> int:
        """The round (and signing sequence) of the final-model message: sync, the last
        round; async, one above the last task round (agents refuse anything lower)."""
        return self.task_seq + 1 if self.asynchronous else self.round

    @property
    def open_round(self) -> int | None:
        return self._open

    # ---- devices ---------------------------------------------------------------------
    def device(self, device_id: str) -> DeviceStats:
        return self.devices.setdefault(device_id, DeviceStats())

    def register(
        self,
        device_id: str,
        capabilities: dict[str, Any],
        graphs: list[str],
        last_round: Any = None,  # the device's last task round (presence); async seq floor
    ) -> None:
        st = self.device(device_id)
        st.capabilities = dict(capabilities)
        st.graphs = [g for g in graphs if isinstance(g, str)][:16]
        if isinstance(last_round, int) and not isinstance(last_round, bool):
            st.last_round = max(st.last_round, last_round)

    def uplink_for(self, device_id: str) -> str:
        """The device's update spec: ``uplink``, or with ``upload_budget_s`` the ladder rung
        its reported uplink rate fits (recorded for the metrics)."""
        spec = self.cfg.uplink
        if self.adaptive is not None:
            spec = self.adaptive.spec_for(self.device(device_id).capabilities).spec
        self._specs[device_id] = spec
        return spec

    def graph_for(self, device_id: str) -> str:
        """``head`` for weak devices when the model has a head graph, else ``full``."""
        if "head" not in self.model.graphs:
            return "full"
        caps = self.device(device_id).capabilities
        if caps.get("profile") == "weak":
            return "head"
        ram, cores = caps.get("ram_mb"), caps.get("cores")
        weak = (isinstance(ram, int) and self.cfg.weak_ram_mb and ram < self.cfg.weak_ram_mb) or (
            isinstance(cores, int) and self.cfg.weak_cores and cores < self.cfg.weak_cores
        )
        return "head" if weak else "full"

    # ---- rounds ----------------------------------------------------------------------
    def sample(self, online: list[str]) -> list[str]:
        k = max(self.cfg.min_sampled, math.ceil(self.cfg.fraction * len(online)))
        return sorted(self.rng.sample(sorted(online), min(k, len(online))))

    def start_round(self, online: list[str], sharded: bool = False) -> LazyTasks:
        """Open round ``self.round + 1`` for a sample of ``online``; returns device -> task
        (a mapping that joins each task's bytes when read; see coordinator/tasks.py).
        ``sharded``: aggregator workers sum the updates; the round closes from their sums."""
        rnd = self.round + 1
        chosen = self.sample(online)
        self._open = rnd
        self._sampled = {d: self.graph_for(d) for d in chosen}
        self._answered, self._records, self._declined = {}, {}, set()
        self.aggregator = make_aggregator(self.strategy, self.schema, self.threads, sharded)
        self._ctx = RoundContext(
            rnd,
            self.model_version,
            self.schema,
            {d: frozenset(self.model.graphs[g].updated) for d, g in self._sampled.items()},
            self._answered,
            self.seen,
        )
        self._bytes_up = 0
        self._payload_up = 0
        self._bytes_down = 0
        self._dev_bytes = Counter()
        self._started = time.monotonic()
        self._budget = self.adaptive.budget if self.adaptive is not None else None
        return self._tasks(rnd, self._sampled)

    def _tasks(
        self, rnd: int, assignment: dict[str, str], plan: dict[str, list[Any]] | None = None
    ) -> LazyTasks:
        """The tasks of round (async: task round) ``rnd`` for ``assignment``, counted.
        ``plan`` (async, see :meth:`_plan`): each device's seed, uplink spec and whether
        the graph goes along, decided (and journaled) beforehand."""
        for d in assignment:
            self.device(d).sampled += 1
            self.device(d).last_round = max(self.device(d).last_round, rnd)
        seed = lambda: self.rng.randrange(2**31)  # noqa: E731
        uplinks = {d: self.uplink_for(d) for d in assignment}
        with_graph = None
        if plan is not None:
            seed = iter([int(plan[d][0]) for d in assignment]).__next__
            uplinks = {d: str(plan[d][1]) for d in assignment}
            with_graph = {d for d in assignment if plan[d][2]}
            self._specs.update(uplinks)
        tasks = build_tasks(
            rnd,
            self.model_version,
            self.model,
            self.params,
            self.cfg,
            self.strategy.configure_round(self.round + 1),
            assignment,
            {d: self.device(d) for d in assignment},
            seed,
            self.run_id,
            uplinks,
            with_graph,
        )
        self._bytes_down += tasks.bytes
        return tasks

    def _plan(self, assignment: dict[str, str]) -> dict[str, list[Any]]:
        """Async: device -> ``[seed, uplink spec, graph included]``, every choice a task's
        bytes depend on beyond the model version and the config, drawn in the order
        :func:`build_tasks` would draw them (same seeds as before this was journaled)."""
        graphs = self.model.graphs
        return {
            d: [self.rng.randrange(2**31), self.uplink_for(d),
                graphs[gid].sha not in self.device(d).graphs]
            for d, gid in assignment.items()
        }  # fmt: skip

    # ---- asynchronous buffers (FedBuff) ------------------------------------------------
    def open_buffer(self, now: float, sharded: bool = False) -> None:
        """Async: start collecting the next model version's ``buffer_size`` updates. Tasks
        already out stay out: their updates land in whatever buffer is open. ``sharded``:
        aggregator workers sum the buffer (staleness weights applied there); it closes
        from their merged sums."""
        if self._open is not None:
            return
        self._open = self.round + 1
        self._answered, self._records = {}, {}
        self.aggregator = make_aggregator(self.strategy, self.schema, self.threads, sharded)
        self._ctx = RoundContext(
            self._open, self.model_version, self.schema, {}, {}, self.seen, tasks=self._out
        )
        self._sampled = {}
        self._bytes_up = self._payload_up = self._bytes_down = 0
        self._dev_bytes = Counter()
        self._started = time.monotonic()
        self._budget = self.adaptive.budget if self.adaptive is not None else None

    @property
    def outstanding(self) -> int:
        return len(self._out)

    def buffer_full(self) -> bool:
        return self.aggregator is not None and self.aggregator.count >= self.cfg.buffer_size

    def _free(self, online: list[str]) -> tuple[int, list[str]]:
        cap = self.cfg.max_concurrent or len(online)
        return cap - len(self._out), [d for d in sorted(online) if d not in self._out]

    def idle(self, online: list[str]) -> list[str]:
        """Online devices without a task, at most as many as free ``max_concurrent`` slots
        (a random choice when more are idle)."""
        free, idle = self._free(online)
        if free <= 0 or not idle:
            return []
        return sorted(self.rng.sample(idle, min(free, len(idle))))

    def dispatch(self, online: list[str], now: float) -> LazyTasks:
        """Async: tasks on the current model for idle online devices (see :meth:`idle`).

        The round field of a task is a dispatch sequence number (shared by the tasks sent
        together, above every round the devices reported): agents refuse a round at or
        below their last one and signatures use it as anti-replay sequence, so it must grow
        per device even while the model version stays. The version a task was built on is
        its ``model_version`` (``r<version>``); staleness = current version - that."""
        chosen = self.idle(online)
        if not chosen:
            return LazyTasks({})
        seq = max([self.task_seq, *(self.device(d).last_round for d in chosen)]) + 1
        assignment = {d: self.graph_for(d) for d in chosen}
        plan = self._plan(assignment)
        if self.journal is not None:  # before the tasks exist outside this process
            self.journal.dispatched(seq, self.round, assignment, plan)
            crash_point("dispatched", self.round)  # TEST HOOK (journal.py): inert unless set
        self._hold(seq, self.round, assignment, now)
        return self._tasks(seq, assignment, plan)

    def take_resend(self) -> LazyTasks:
        """Async: the journaled tasks a restart sends again (see :meth:`_rebuild_journaled`),
        once; the loop sends them as soon as a buffer is open, before it reads any update,
        so each is still held (and signed) with its own round."""
        tasks, self._resend = self._resend, LazyTasks({})
        self._resent.update({d: r for d in tasks if (r := self.task_round(d)) is not None})
        if tasks:
            log.info("sending again %d journaled tasks: %s", len(tasks), ", ".join(tasks))
        return tasks

    def _hold(self, seq: int, version: int, assignment: dict[str, str], now: float) -> None:
        """Record tasks ``device -> graph`` of dispatch ``seq`` on model ``version`` as out."""
        self.task_seq = max(self.task_seq, seq)
        for d, gid in assignment.items():
            allowed = frozenset(self.model.graphs[gid].updated)
            self._out[d] = HeldTask(seq, version, gid, allowed, now)
            self._sampled[d] = gid

    def task_round(self, device: str) -> int | None:
        """The round field of the task ``device`` holds (async), or of the open round."""
        if self.asynchronous:
            held = self._out.get(device)
            return held.round if held else None
        return self._open

    def _release(self, device: str) -> HeldTask | None:
        return self._out.pop(device, None)

    def expire(self, now: float) -> None:
        """Async: tasks out longer than ``round_timeout`` are dropped ("deadline") and their
        devices may get a new task."""
        for d, held in sorted(self._out.items()):
            if now - held.issued > self.cfg.round_timeout:
                self._release(d)
                self._drop(Drop(d, DropReason.DEADLINE, "task outstanding past round_timeout"))

    def next_deadline(self, now: float) -> float:
        """When the oldest task expires (async), at most ``round_timeout`` from ``now``."""
        issued = [t.issued for t in self._out.values()]
        return min([now + self.cfg.round_timeout, *(t + self.cfg.round_timeout for t in issued)])

    def collect_done(self, online: Any = ()) -> bool:
        """Whether a collector may stop reading updates: sync, every sampled device answered;
        async, the buffer is full or an online device is idle with a slot free."""
        if not self.asynchronous:
            return self.all_answered()
        free, idle = self._free(sorted(online))
        return self.buffer_full() or (free > 0 and bool(idle))

    def announcement(self, for_workers: bool = False) -> RoundAnnouncement:
        """The open round as announced: to devices (round, version, sampled) or, with
        ``for_workers``, to aggregator workers (plus schema and each device's tensors)."""
        if self._open is None or self._ctx is None:
            raise RuntimeError("no open round")
        sampled = sorted(self._sampled)
        if not for_workers:
            return RoundAnnouncement(self._open, self.model_version, sampled)
        if self.asynchronous:  # a buffer: every task out, whatever buffer it was sent in
            cfg = self.cfg
            return RoundAnnouncement(
                self._open, self.model_version, sorted(self._out),
                {k: list(v) for k, v in self.schema.items()},
                {d: sorted(t.allowed) for d, t in self._out.items()},
                {d: [t.round, t.version] for d, t in self._out.items()},
                {"version": self.round, "max": cfg.max_staleness, "weight": cfg.staleness_weight},
            )  # fmt: skip
        return RoundAnnouncement(
            self._open,
            self.model_version,
            sampled,
            {k: list(v) for k, v in self.schema.items()},
            {d: sorted(t) for d, t in self._ctx.allowed.items()},
        )

    def _drop(self, drop: Drop) -> bool:
        log.warning("round %s: dropped update from %s: %s", self._open, drop.device, drop.text)
        self._drops.append(drop)
        if drop.device in self.devices:
            self.devices[drop.device].dropped += 1
        return False

    def _context(self) -> RoundContext:
        if self._ctx is None or self._open is None:  # between rounds: everything is late
            return RoundContext(None, self.model_version, self.schema, {}, {}, self.seen)
        return self._ctx

    def handle_update(self, topic_device: str, data: bytes) -> bool:
        """Check one update message with the intake and add it to the round's aggregation;
        False (reason logged and counted) if dropped."""
        held = self._out.get(topic_device)
        ok = self._handle_update(topic_device, data)
        if self.journal is not None and held and self._out.get(topic_device) is not held:
            self.journal.update(topic_device, data)  # it answered its task: replay it
        return ok

    def _handle_update(self, topic_device: str, data: bytes) -> bool:
        self._bytes_up += len(data)
        self._dev_bytes[topic_device] += len(data)
        res = accept(topic_device, data, self._context())
        if isinstance(res, Drop):
            if res.reason is DropReason.DEVICE_ERROR and (
                topic_device in self._sampled or topic_device in self._out
            ):
                self.device(topic_device).graphs = []  # resend the graph next time
                self._release(topic_device)  # async: it may take a new task
                if res.answered:  # refused or failed this round: no update will come
                    self._declined.add(topic_device)
            return self._drop(res)
        if self.asynchronous:
            held = self._release(res.device)
            stale = self.round - (held.version if held is not None else self.round)
            if stale > self.cfg.max_staleness:
                self.seen.check_and_add(res.key)  # a copy of it is a duplicate, not stale again
                why = f"{stale} versions behind (max_staleness {self.cfg.max_staleness})"
                return self._drop(Drop(res.device, DropReason.STALE, why))
            self._staleness.append(stale)
            res = replace(res, scale=res.scale * self.staleness_weight(stale))
        self.add_accepted(res)
        return True

    def add_accepted(self, u: AcceptedUpdate) -> None:
        """Count an update the intake accepted (also the entry for an async buffer)."""
        assert self.aggregator is not None
        self.seen.check_and_add(u.key)
        self.aggregator.add(u)
        self._answered[u.device] = u.key
        self._records[u.key] = (u.num_samples, u.header.loss)
        self._payload_up += u.payload_bytes
        st = self.device(u.device)
        st.accepted += 1
        st.bytes_up += u.message_bytes

    def all_answered(self) -> bool:
        return bool(self._sampled) and set(self._answered) | self._declined >= set(self._sampled)

    def pending(self) -> list[str]:
        """Devices whose update is awaited (async: those holding a task)."""
        if self.asynchronous:
            return sorted(self._out)
        return sorted(set(self._sampled) - set(self._answered) - self._declined)

    def finish_round(self, merged: Any = None, clock_s: float = 0.0) -> RoundMetrics:
        """Close the open round: missing devices are dropped as "deadline", the accepted
        updates are aggregated, the model is evaluated and the round counter advances.

        ``merged`` (sharded rounds): the aggregator workers' merged partials, an
        :class:`edgefed.sharding.merge.MergeResult`; per-device bytes and train loss stay
        with the workers, so they are reported as 0 / None here."""
        if self._open is None or self.aggregator is None:
            raise RuntimeError("no open round")
        reported = set()
        if merged is not None:
            self._take_merged(merged)
            reported = set(merged.dropped)
        for d in [] if self.asynchronous else self.pending():
            if d not in reported:
                self._drop(Drop(d, DropReason.DEADLINE, "no update before the round closed"))
        t0 = time.monotonic()
        self.params = self.aggregator.close(self._open, self.params)
        agg_s = time.monotonic() - t0
        self.aggregator = None
        self._ctx = None
        self.round = self._open
        self._open = None
        self.cum_up += self._bytes_up
        self.cum_down += self._bytes_down
        recs = list(self._records.values())
        losses = [(loss, n) for n, loss in recs if loss is not None]
        tl = sum(a * n for a, n in losses) / sum(n for _, n in losses) if losses else None
        acc = eloss = None
        if self.evaluate is not None:
            acc, eloss = self.evaluate(self.params)
        wall = time.monotonic() - self._started
        m = RoundMetrics(
            round=self.round,
            model_version=self.model_version,
            sampled=len(self._sampled),
            participants=len(recs),
            dropped=dict(Counter(d.reason.value for d in self._drops)),
            drop_log=[d.to_dict() for d in self._drops],
            bytes_up=self._bytes_up,
            payload_up=self._payload_up,
            bytes_down=self._bytes_down,
            cum_bytes_up=self.cum_up,
            cum_bytes_down=self.cum_down,
            train_loss=tl,
            accuracy=acc,
            eval_loss=eloss,
            wall_seconds=wall,
            aggregate_seconds=agg_s,
            mode=self.cfg.mode,
            clock_s=float(clock_s),
            staleness_mean=sum(self._staleness) / len(self._staleness) if self._staleness else None,
            staleness_max=max(self._staleness, default=None),
            uplink={
                d: {"spec": self._specs.get(d, self.cfg.uplink), "bytes": self._dev_bytes[d]}
                for d in sorted(set(self._specs) | set(self._dev_bytes))
                if d in self.devices
            },
            upload_budget_s=self._budget,
        )
        if self.adaptive is not None and not self.asynchronous:
            self.adaptive.observe_round(wall)  # an "auto" budget follows the round time
        self.history.append(m.to_dict())
        self._drops = []  # drops between rounds (late copies) land in the next round's metrics
        self._specs, self._staleness = {}, []
        return m

    def _take_merged(self, res: Any) -> None:
        agg = self.aggregator
        if not hasattr(agg, "add_sums"):
            raise RuntimeError("round was not opened as sharded")
        if self.asynchronous:
            self._take_merged_buffer(res)
        for dev, rnd, uid in [] if self.asynchronous else res.keys:
            if dev in self._sampled and rnd == self._open:
                self.seen.check_and_add((dev, rnd, uid))
                self._answered[dev] = (dev, rnd, uid)
                self._records[(dev, rnd, uid)] = (0, None)
                self.device(dev).accepted += 1
        agg.add_sums(res.sums, res.weights, len(res.keys))  # type: ignore[union-attr]
        for drop in res.worker_drops:
            self._drop(self._copy_of_counted(drop))
        for _ in range(max(0, res.worker_rejected_updates - len(res.worker_drops))):
            self._drop(Drop("(worker)", DropReason.INVALID, "rejected by an aggregator worker"))
        for _, drop in sorted(res.dropped.items()):
            self._drop(drop)

    def _take_merged_buffer(self, res: Any) -> None:
        """Async, sharded: the workers counted these updates (staleness-weighted there);
        release their tasks and record their staleness, as :meth:`handle_update` does."""
        for dev, rnd, uid in res.keys:
            held = self._out.get(dev)
            if held is not None and held.round == rnd:
                self._release(dev)
                self._staleness.append(self.round - held.version)
            if self._resent.get(dev) == rnd:  # a copy of it may still reach a worker
                self._copies.add(dev)
            self.seen.check_and_add((dev, rnd, uid))
            self._records[(dev, rnd, uid)] = (0, None)
            self.device(dev).accepted += 1
        for drop in res.worker_drops:  # stale, or the device's error: no update will come
            if drop.reason in (DropReason.STALE, DropReason.DEVICE_ERROR):
                self._release(drop.device)

    def _copy_of_counted(self, drop: Drop) -> Drop:
        """Sharded async: a worker's ``late`` for a device whose task was sent again after a
        restart (:meth:`take_resend`) and whose update for that task was counted since is
        the device's answer to the copy -- its stored update, the same key -- reaching a
        worker after the task was released. A worker knows only its open buffer's keys, so
        it cannot tell; here it is what the unsharded intake calls it: a duplicate."""
        dev = drop.device
        if drop.reason is not DropReason.LATE or dev not in self._copies:
            return drop
        self._copies.discard(dev)
        why = f"copy of its update for task {self._resent.pop(dev, '?')}, counted already"
        return Drop(dev, DropReason.DUPLICATE, why, redelivery=True)

    # ---- checkpoints -----------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        from dataclasses import asdict

        return Checkpoint(
            self.round,
            self.model_version,
            self.params,
            self.strategy.state_dict(),
            {
                "devices": {k: asdict(v) for k, v in self.devices.items()},
                "history": self.history,
                "cum_bytes_up": self.cum_up,
                "cum_bytes_down": self.cum_down,
                "rng": list(self.rng.getstate()[1]),
                "seen": [list(k) for k in self.seen.keys()[-10000:]],
                "run_id": self.run_id,
                "task_seq": self.task_seq,
                # async: the tasks out when this version closed (their updates are accepted
                # after a restart; coordinator/journal.py has what came after)
                # and when each went out, on the collector's clock (kept by a resumed
                # simulated fleet, whose clock goes on; re-stamped by a restarted process)
                "outstanding": {
                    d: [t.round, t.version, t.graph, t.issued] for d, t in self._out.items()
                },
                **self._norm_bound_meta(),
            },
        )

    def _norm_bound_meta(self) -> dict[str, Any]:
        """The adaptive norm bound's history: without it a restarted coordinator would run
        its warm-up again, the rounds in which an attacker's scaled update is bounded only
        by the round's own median."""
        nb = self.strategy.norm_bound
        return {"norm_bound": nb.state()} if nb is not None else {}

    def restore(self, ck: Checkpoint) -> None:
        if set(ck.params) != set(self.params):
            raise ValueError("checkpoint tensors do not match the model")
        for k, v in ck.params.items():
            if v.shape != self.params[k].shape:
                raise ValueError(f"checkpoint tensor {k!r} has shape {v.shape}")
        self.params = {k: v.astype(np.float32) for k, v in ck.params.items()}
        self.strategy.load_state_dict(ck.strategy_state)
        self.round = ck.round
        meta = ck.meta
        self.run_id = str(meta.get("run_id") or self.run_id)
        self.task_seq = int(meta.get("task_seq", 0))
        self._out = {}
        for d, (seq, version, gid, *issued) in sorted(meta.get("outstanding", {}).items()):
            if gid not in self.model.graphs:
                raise ValueError(f"checkpoint: outstanding task of {d!r} trains graph {gid!r}")
            self._hold(int(seq), int(version), {d: gid}, float(issued[0]) if issued else 0.0)
        nb = self.strategy.norm_bound
        if nb is not None and "norm_bound" in meta:
            nb.load_state(meta["norm_bound"])  # NormBoundError names a malformed history
        self.devices = {k: DeviceStats(**v) for k, v in meta.get("devices", {}).items()}
        for st in self.devices.values():
            st.graphs = []  # a device may have lost its cache; resending a graph is cheap
        self.history = list(meta.get("history", []))
        if self.adaptive is not None and not self.asynchronous:  # "auto" resumes its window
            for h in self.history[-self.adaptive.window :]:
                self.adaptive.observe_round(float(h.get("wall_seconds", 0.0)))
        self.cum_up = int(meta.get("cum_bytes_up", 0))
        self.cum_down = int(meta.get("cum_bytes_down", 0))
        if meta.get("rng"):
            self.rng.setstate((3, tuple(meta["rng"]), None))
        for k in meta.get("seen", []):
            self.seen.check_and_add(tuple(k))

    # ---- restart of an asynchronous buffer ----------------------------------------------
    def resume(
        self, journal: Journal, now: float, sharded: bool = False, restamp: bool = True
    ) -> None:
        """Async, after :meth:`restore` (or on a fresh start): take the tasks restored from
        the checkpoint as issued ``now`` (a fresh ``round_timeout``: the old clock is gone;
        ``restamp=False`` when the collector's clock was restored with the checkpoint),
        replay what ``journal`` recorded since that checkpoint (the dispatches and the
        update messages, through the same intake: the partially filled buffer comes back
        with the same keys and staleness), then keep journaling into it. ``sharded``: the
        buffer is summed by aggregator workers (only dispatches are journaled then; the
        workers keep the buffer's updates across the restart, see sharding/worker.py)."""
        if restamp:
            self._out = {d: replace(t, issued=now) for d, t in self._out.items()}
        events = journal.read(self.round, self.run_id)
        restored, replayed = len(self._out), 0
        journaled: dict[str, tuple[int, str, list[Any] | None]] = {}
        if events:
            self.open_buffer(now, sharded)
            for ev in events:
                if "dispatch" in ev:
                    d = ev["dispatch"]
                    seq, tasks = int(d["seq"]), dict(d["tasks"])
                    self._hold(seq, int(d["version"]), tasks, now)
                    plan = d.get("plan") or {}  # absent from older journals
                    for dev, gid in tasks.items():
                        journaled[dev] = (seq, gid, plan.get(dev))
                else:
                    self.handle_update(*decode_update(ev))
                    replayed += 1
        self._resend = self._rebuild_journaled({  # those answered (replayed above) need nothing
            d: r for d, r in journaled.items() if d in self._out and self._out[d].round == r[0]
        })  # fmt: skip
        journal.start(self.round, self.run_id, events)
        self.journal = journal
        if restored or events:
            log.info(
                "resumed version %d: %d tasks outstanding at the checkpoint, %d journal events "
                "(%d update messages replayed, %d in the open buffer), %d tasks out now, "
                "%d to send again",
                self.round, restored, len(events), replayed,
                self.aggregator.count if self.aggregator else 0, len(self._out),
                len(self._resend),
            )  # fmt: skip

    def _rebuild_journaled(self, due: dict[str, tuple[int, str, list[Any] | None]]) -> LazyTasks:
        """Async, in :meth:`resume`: the tasks ``due`` (device -> (task round, graph, plan)),
        which the journal says were dispatched on this version and are still out, rebuilt
        to send again (:meth:`take_resend`).

        Rebuilt here, not at that dispatch: the replayed buffer may be full already, and
        the version closes (new weights) before the loop sends them; a task is the weights
        of the version it was journaled on, encoded now (only the joining of its bytes
        waits, see coordinator/tasks.py).

        Why: the journal line is fsynced BEFORE the task is published (it must be: a task
        out that the coordinator forgot would have its update dropped as ``late``), so a
        kill in between restores a task no device ever received, and nothing else would send
        it: the device idles and the coordinator waits ``round_timeout`` for it, then drops
        it as ``deadline``. Sending every such task again is harmless for a device that
        did get it: same run, same round (dispatch sequence) and version, so the agent
        answers it with its stored update (same update id: dropped as a duplicate, the
        key is counted once), or a signed agent's verifier takes the same sequence again
        and the agent does the same; it never trains twice. Should a device answer twice
        anyway (an agent that lost its outbox), the first accepted update releases the task
        and the second is ``late`` (sharded: one worker keeps one key per device, the merge
        one per round). The set is fixed here (the tasks still out after the replay) and
        sent before any update is read, so what a restart sends does not depend on how
        fast the broker delivers (nor does a test), and each task is still held with its
        round when it is signed.

        Why rebuilt rather than journaled bytes: a task carries the model's weights (a
        model-sized fsync per task). The journal keeps the version (its weights are the
        checkpoint's), the round and graph, and the plan -- seed, uplink spec, whether the
        graph went along (:meth:`_plan`) -- so the rebuilt task is the original byte for byte
        (and, Ed25519 being deterministic, so is its signature). A journal written before
        the plan was journaled rebuilds with a fresh seed, today's uplink spec and the graph
        included: the same task identity (round, version, graph), a different seed.
        Tasks restored from the checkpoint (older versions) are not sent again: their
        weights are gone, and the process that published them lived on to close a version
        and fsync a checkpoint, long after the broker acknowledged them."""
        groups: dict[int, dict[str, tuple[str, list[Any] | None]]] = {}
        for d, (seq, gid, plan) in sorted(due.items()):
            groups.setdefault(seq, {})[d] = (gid, plan)
        out = LazyTasks({})
        for seq, group in sorted(groups.items()):
            assignment = {d: gid for d, (gid, _) in group.items()}
            plans = {
                d: list(p) if p is not None and len(p) == 3 else None for d, (_, p) in group.items()
            }
            fresh = self._plan({d: assignment[d] for d, p in plans.items() if p is None})
            plan = {d: p if p is not None else [*fresh[d][:2], True] for d, p in plans.items()}
            out = _joined(out, self._tasks(seq, assignment, plan))
        if out:
            which = ", ".join(f"{d} (task {due[d][0]})" for d in sorted(out))
            log.info("rebuilt %d journaled tasks of version %d to send again: %s",
                     len(out), self.round, which)  # fmt: skip
        return out


def _joined(a: LazyTasks, b: LazyTasks) -> LazyTasks:
    """Both mappings' tasks (and byte counts) in one."""
    if not a:
        return b
    out = LazyTasks({})
    for part in (a, b):
        out.update(part)
        out.bytes += part.bytes
    return out
