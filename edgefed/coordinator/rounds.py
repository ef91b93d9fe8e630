"""The round logic of the coordinator, independent of the transport.

The MQTT service (:mod:`.service`) and the in-process simulation fast path
(:mod:`edgefed.simulation`) drive the SAME object: :meth:`RoundEngine.start_round` returns
the task bytes for each sampled device, :meth:`RoundEngine.handle_update` takes an update's
bytes and accepts it or records why it was dropped, :meth:`RoundEngine.finish_round`
aggregates, evaluates, advances the model and returns the round's metrics.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefed.codec import (
    CodecError,
    CompressionSpec,
    ModelSchema,
    UpdateMeta,
    decode_update,
    encode_update,
)
from edgefed.coordinator.checkpoint import Checkpoint
from edgefed.coordinator.metrics import RoundMetrics
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.tasks import LazyTasks
from edgefed.strategies import (
    ClientUpdate,
    LinearStrategy,
    Strategy,
    UpdateRejected,
    clip_update,
    validate_update,
)
from edgefed.transport.dedupe import SeenSet
from edgefed.transport.message import MessageError, PackedMessage, require, unpack

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


@dataclass
class DeviceStats:
    graphs: list[str] = field(default_factory=list)  # graph shas the device holds
    capabilities: dict[str, Any] = field(default_factory=dict)
    sampled: int = 0
    accepted: int = 0
    dropped: int = 0
    bytes_up: int = 0


class RoundEngine:
    def __init__(
        self,
        model: FederatedModel,
        strategy: Strategy,
        config: RoundConfig,
        evaluate: Any = None,  # callable(params) -> (accuracy, loss) or None
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.cfg = config
        self.evaluate = evaluate
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
        self._accepted: dict[str, ClientUpdate] = {}
        # Linear strategies aggregate on arrival (bounded memory); others at the round's end.
        # Decided again when each round opens (see _streaming_allowed).
        self._streaming = self._streaming_allowed()
        self._sums: dict[str, np.ndarray] = {}
        self._wsum: dict[str, np.ndarray] = {}
        self._drops: list[dict[str, str]] = []
        self._bytes_up = 0
        self._payload_up = 0
        self._bytes_down = 0
        self._started = 0.0
        for spec in (config.uplink, config.downlink):
            CompressionSpec.parse(spec)  # fail at start-up, not in round 1

    @property
    def model_version(self) -> str:
        return f"r{self.round}"

    @property
    def open_round(self) -> int | None:
        return self._open

    # ---- devices ---------------------------------------------------------------------
    def device(self, device_id: str) -> DeviceStats:
        return self.devices.setdefault(device_id, DeviceStats())

    def register(self, device_id: str, capabilities: dict[str, Any], graphs: list[str]) -> None:
        st = self.device(device_id)
        st.capabilities = dict(capabilities)
        st.graphs = [g for g in graphs if isinstance(g, str)][:16]

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

    def start_round(self, online: list[str]) -> LazyTasks:
        """Open round ``self.round + 1`` for a sample of ``online``; returns device -> task
        (a mapping that joins each task's bytes when read; see coordinator/tasks.py)."""
        rnd = self.round + 1
        chosen = self.sample(online)
        self._open = rnd
        self._streaming = self._streaming_allowed()
        self._sampled = {d: self.graph_for(d) for d in chosen}
        self._accepted = {}
        self._sums, self._wsum = {}, {}
        self._bytes_up = 0
        self._payload_up = 0
        self._bytes_down = 0
        self._started = time.monotonic()
        meta = UpdateMeta(rnd, "coordinator", 0, self.model_version, kind="weights")
        weights = encode_update(self.params, meta, CompressionSpec.parse(self.cfg.downlink))
        hyper = {
            "epochs": self.cfg.local_epochs,
            "batch_size": self.cfg.batch_size,
            "lr": self.cfg.lr,
            **self.strategy.configure_round(rnd),
        }
        tasks: dict[str, PackedMessage] = {}
        for d, gid in self._sampled.items():
            g = self.model.graphs[gid]
            st = self.device(d)
            st.sampled += 1
            header = {
                "type": "task",
                "run_id": self.run_id,
                "round": rnd,
                "model_version": self.model_version,
                "graph_id": gid,
                "graph_sha": g.sha,
                "hyper": {**hyper, "seed": self.rng.randrange(2**31)},
                "uplink": self.cfg.uplink,
                "error_feedback": self.cfg.error_feedback,
                "schema": {k: list(v) for k, v in self.model.shapes.items()},
                "deadline_s": self.cfg.round_timeout,
            }
            parts = {"weights": weights}
            if g.sha not in st.graphs:  # the step graph only when the device lacks it
                import json

                parts["graph"] = g.onnx
                parts["manifest"] = json.dumps(g.manifest).encode()
                parts["inference"] = g.inference_onnx
                st.graphs = [*st.graphs, g.sha][-16:]
            tasks[d] = PackedMessage(header, parts)
            self._bytes_down += len(tasks[d])
        return LazyTasks({d: m.to_bytes for d, m in tasks.items()})

    def _drop(self, device: str, reason: str) -> bool:
        log.warning("round %s: dropped update from %s: %s", self._open, device, reason)
        self._drops.append({"device": device, "reason": reason})
        if device in self.devices:
            self.devices[device].dropped += 1
        return False

    def handle_update(self, topic_device: str, data: bytes) -> bool:
        """Validate and accept one update message; False (reason logged) if dropped."""
        self._bytes_up += len(data)
        try:
            header, parts = unpack(data)
            rnd = require(header, "round", int)
            dev = require(header, "device_id", str)
            update_id = require(header, "update_id", str)
            if "error" in header:
                if topic_device in self._sampled and rnd == self._open:
                    self.device(topic_device).graphs = []  # resend the graph next time
                return self._drop(topic_device, f"device error: {str(header['error'])[:200]}")
            num = require(header, "num_samples", int)
        except MessageError as e:
            return self._drop(topic_device, f"invalid: {e.reason}")
        if dev != topic_device:
            return self._drop(topic_device, f"invalid: header device {dev!r} != topic device")
        if self._open is None or rnd < self._open:
            return self._drop(dev, f"late: update for round {rnd}")
        if rnd > self._open:
            return self._drop(dev, f"invalid: update for future round {rnd}")
        if dev not in self._sampled:
            return self._drop(dev, "not sampled this round")
        key = (dev, rnd, update_id)
        if key in self.seen:  # remembered only once accepted: a corrupt copy with the
            return self._drop(dev, "duplicate: update already counted")  # same id can't block

        if dev in self._accepted:
            return self._drop(dev, "duplicate: device already answered this round")
        if "update" not in parts:
            return self._drop(dev, "invalid: no update part")
        try:
            upd = decode_update(parts["update"], self.schema)
            m = upd.meta
            if (m.round, m.device_id, m.num_samples, m.kind) != (rnd, dev, num, "delta"):
                return self._drop(dev, "invalid: codec metadata disagrees with the header")
            dense = upd.to_dense()
        except CodecError as e:
            return self._drop(dev, f"invalid: {e.reason}")
        allowed = set(self.model.graphs[self._sampled[dev]].updated)
        extra = set(dense) - allowed
        if extra:
            return self._drop(dev, f"invalid: tensors outside its graph: {sorted(extra)[:3]}")
        loss = header.get("loss")
        cu = ClientUpdate(
            dev,
            {k: np.asarray(v, np.float32) for k, v in dense.items()},
            num,
            None,
            float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None,
        )
        try:
            validate_update(self.params, cu)
        except UpdateRejected as e:
            return self._drop(dev, f"invalid: {e.reason}")
        self.seen.check_and_add(key)
        if self._streaming:
            self._accumulate(cu)
            cu = ClientUpdate(dev, {}, cu.num_samples, None, cu.loss)  # keep only the record
        self._accepted[dev] = cu
        self._payload_up += len(parts["update"])
        st = self.device(dev)
        st.accepted += 1
        st.bytes_up += len(data)
        return True

    def _streaming_allowed(self) -> bool:
        """Aggregate on arrival only for linear strategies without an adaptive norm bound:
        the adaptive bound needs every norm of the round before it clips any update."""
        return (
            isinstance(self.strategy, LinearStrategy)
            and getattr(self.strategy, "norm_bound", None) is None
        )

    def _accumulate(self, cu: ClientUpdate) -> None:
        """Fold one validated update into the running per-coordinate sums, so memory stays
        at two model-sized buffers however many devices answer (linear strategies only;
        robust ones need every update and keep them)."""
        delta = cu.delta
        if self.strategy.max_update_norm is not None:
            delta = clip_update(delta, self.strategy.max_update_norm)[0]
        w = float(cu.num_samples)
        for name, d in delta.items():
            if name not in self._sums:
                self._sums[name] = np.zeros(d.shape, np.float64)
                self._wsum[name] = np.zeros(d.shape, np.float64)
            self._sums[name] += w * d
            self._wsum[name] += w

    def all_answered(self) -> bool:
        return bool(self._sampled) and set(self._accepted) == set(self._sampled)

    def pending(self) -> list[str]:
        return sorted(set(self._sampled) - set(self._accepted))

    def finish_round(self) -> RoundMetrics:
        """Close the open round: missing devices are dropped as "deadline", the accepted
        updates are aggregated, the model is evaluated and the round counter advances."""
        if self._open is None:
            raise RuntimeError("no open round")
        for d in self.pending():
            self._drop(d, "deadline: no update before the round closed")
        return self._close(self._sums, self._wsum)

    def finish_round_from_sums(self, res: Any) -> RoundMetrics:
        """Close the open round from the aggregator workers' merged partials (an
        :class:`edgefed.sharding.merge.MergeResult`) instead of updates this process collected:
        the strategy's (sum, weight) path, as with streaming. Per-device bytes and train loss
        stay with the workers, so they are reported as 0 / None here."""
        if self._open is None:
            raise RuntimeError("no open round")
        if not isinstance(self.strategy, LinearStrategy):
            raise RuntimeError("sharded aggregation needs a linear strategy")
        for dev, rnd, uid in res.keys:
            if dev in self._sampled and rnd == self._open:
                self.seen.check_and_add((dev, rnd, uid))
                self._accepted[dev] = ClientUpdate(dev, {}, 0, None, None)
                self.device(dev).accepted += 1
        for dev, reason in sorted(res.dropped.items()):
            self._drop(dev, reason)
        for _ in range(res.worker_rejected_updates):
            self._drop("(worker)", "invalid: rejected by an aggregator worker")
        for d in self.pending():
            if d not in res.dropped:
                self._drop(d, "deadline: no update before the round closed")
        return self._close(dict(res.sums), dict(res.weights), streaming=True)

    def _close(
        self, sums: dict[str, np.ndarray], wsum: dict[str, np.ndarray], streaming: bool = False
    ) -> RoundMetrics:
        assert self._open is not None
        t0 = time.monotonic()
        ups = list(self._accepted.values())
        if self._streaming or streaming:
            assert isinstance(self.strategy, LinearStrategy)
            self.params = self.strategy.apply_sums(self._open, self.params, sums, wsum)
            self._sums, self._wsum = {}, {}
        else:
            self.params = self.strategy.aggregate(self._open, self.params, ups)
        agg_s = time.monotonic() - t0
        self.round = self._open
        self._open = None
        self.cum_up += self._bytes_up
        self.cum_down += self._bytes_down
        losses = [(u.loss, u.num_samples) for u in ups if u.loss is not None]
        tl = sum(a * n for a, n in losses) / sum(n for _, n in losses) if losses else None
        acc = eloss = None
        if self.evaluate is not None:
            acc, eloss = self.evaluate(self.params)
        m = RoundMetrics(
            round=self.round,
            model_version=self.model_version,
            sampled=len(self._sampled),
            participants=len(ups),
            dropped=dict(Counter(d["reason"].split(":")[0] for d in self._drops)),
            drop_log=list(self._drops),
            bytes_up=self._bytes_up,
            payload_up=self._payload_up,
            bytes_down=self._bytes_down,
            cum_bytes_up=self.cum_up,
            cum_bytes_down=self.cum_down,
            train_loss=tl,
            accuracy=acc,
            eval_loss=eloss,
            wall_seconds=time.monotonic() - self._started,
            aggregate_seconds=agg_s,
        )
        self.history.append(m.to_dict())
        self._drops = []  # drops between rounds (late copies) land in the next round's metrics
        return m

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
                **self._norm_bound_meta(),
            },
        )

    def _norm_bound_meta(self) -> dict[str, Any]:
        """The adaptive norm bound's history: without it a restarted coordinator would run
        its warm-up again, the rounds in which an attacker's scaled update is bounded only
        by the round's own median."""
        nb = getattr(self.strategy, "norm_bound", None)
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
        nb = getattr(self.strategy, "norm_bound", None)
        if nb is not None and "norm_bound" in meta:
            nb.load_state(meta["norm_bound"])  # NormBoundError names a malformed history
        self.devices = {k: DeviceStats(**v) for k, v in meta.get("devices", {}).items()}
        for st in self.devices.values():
            st.graphs = []  # a device may have lost its cache; resending a graph is cheap
        self.history = list(meta.get("history", []))
        self.cum_up = int(meta.get("cum_bytes_up", 0))
        self.cum_down = int(meta.get("cum_bytes_down", 0))
        if meta.get("rng"):
            self.rng.setstate((3, tuple(meta["rng"]), None))
        for k in meta.get("seen", []):
            self.seen.check_and_add(tuple(k))
