"""The coordinator service: the round loop over MQTT around a :class:`RoundEngine`.

Per round: wait until ``min_devices`` are online (presence messages, retained, with Last
Will), sample, publish the round announcement and each sampled device's task, collect
updates until every sampled device answered or the deadline passed, aggregate, evaluate,
checkpoint atomically, write metrics. Restarted with the same checkpoint path, it resumes
after the last finished round. Every incoming message is handled inside a try: a malformed
one is logged with its reason and counted, and the service keeps going.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from edgefed.coordinator.checkpoint import load_checkpoint, save_checkpoint
from edgefed.coordinator.metrics import MetricsWriter, RoundMetrics
from edgefed.coordinator.rounds import RoundEngine
from edgefed.security.downlink import DownlinkSigner
from edgefed.sharding.config import ShardingConfig
from edgefed.transport import Topics, TransportConfig
from edgefed.transport.client import Incoming, MqttClient

log = logging.getLogger(__name__)


class CoordinatorService:
    def __init__(
        self,
        engine: RoundEngine,
        transport: TransportConfig,
        rounds: int,
        checkpoint: str | Path | None = None,
        metrics: MetricsWriter | None = None,
        wait_timeout: float = 300.0,
        client_id: str | None = None,  # default edgefed-coordinator-<fleet>
        sharding: ShardingConfig | None = None,
        signer: DownlinkSigner | None = None,
        sharding_transport: TransportConfig | None = None,  # default: ``transport``
    ) -> None:
        self.engine = engine
        self.rounds = rounds
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.metrics = metrics or MetricsWriter(None, None)
        self.wait_timeout = wait_timeout
        self.topics = Topics(transport.fleet, transport.topic_prefix)
        client_id = client_id or f"edgefed-coordinator-{transport.fleet}"
        # Sharded: the aggregator workers read the updates ($share/...), this process only
        # presence; it merges the workers' partial sums (docs/scale-out.md).
        subs = [self.topics.all_presence]
        if sharding is None:
            subs.append(self.topics.all_updates)
        self.client = MqttClient(transport, client_id, subscriptions=subs)
        self._tasks: Mapping[str, bytes] = {}  # device -> (signed) task of the open round
        # Every downlink message is signed (topic-bound, round as anti-replay sequence) when a
        # key is configured; without one agents cannot tell our model from a forged one.
        self.signer = signer
        if signer is None:
            log.warning("no [security] signing_key: downlink messages are NOT signed (demo only)")
        self.agg = None
        if sharding is not None:
            from edgefed.sharding.driver import ShardedAggregation

            self.agg = ShardedAggregation(
                sharding_transport or transport, engine.schema, sharding, resend=self._resend,
                client_id=f"{client_id}-agg",
            )  # fmt: skip
        self.online: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self._stop = threading.Event()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.settle = 0.3  # seconds of extra presence reading before each round's sample

    # ---- inbox -----------------------------------------------------------------------
    def _handle(self, m: Incoming) -> None:
        try:
            kind, device = self.topics.parse(m.topic)
        except ValueError as e:
            self._reject(m.topic, str(e))
            return
        if kind == "presence":
            self._presence(device, m.payload)
        elif kind == "update":
            self.engine.handle_update(device, m.payload)
        else:
            self._reject(m.topic, "coordinator does not read this topic")

    def _reject(self, topic: str, reason: str) -> None:
        log.warning("rejected message on %s: %s", topic, reason)
        self.rejected[reason.split(":")[0]] += 1

    def _presence(self, device: str, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict) or msg.get("status") not in ("online", "offline"):
                raise ValueError("status must be online or offline")
            if msg.get("device_id", device) != device:
                raise ValueError("device_id disagrees with the topic")
        except (ValueError, UnicodeDecodeError) as e:
            self._reject(f"presence/{device}", f"invalid presence: {e}")
            return
        except RecursionError:  # deeply nested JSON
            self._reject(f"presence/{device}", "invalid presence: JSON nested too deeply")
            return
        if msg["status"] == "offline":
            self.online.discard(device)
            log.info("device %s went offline", device)
            return
        caps = msg.get("capabilities", {})
        graphs = msg.get("graphs", [])
        self.engine.register(
            device,
            caps if isinstance(caps, dict) else {},
            graphs if isinstance(graphs, list) else [],
        )
        if device not in self.online:
            log.info("device %s online (%s)", device, caps.get("arch", "?"))
        self.online.add(device)
        if self.engine.open_round is not None and device in self.engine.pending():
            self._resend([device])  # (re)connected mid-round: it may have lost its task

    def _pump(self, until: float, done=lambda: False) -> None:
        while not self._stop.is_set() and not done() and time.monotonic() < until:
            m = self.client.get(timeout=min(0.1, max(0.0, until - time.monotonic())))
            if m is not None:
                try:
                    self._handle(m)
                except Exception:  # never let one message end the service
                    log.exception("error handling message on %s", m.topic)
                    self.rejected["handler error"] += 1

    def _resend(self, devices: list[str]) -> None:
        """A worker died holding updates: send those devices their task again; the agent
        answers a repeated task with its stored update (same update id)."""
        for d in devices:
            if d in self._tasks:
                self.client.publish(self.topics.task(d), self._tasks[d])

    def _enough_devices(self) -> bool:
        return len(self.online) >= self.engine.cfg.min_devices

    # ---- loop ------------------------------------------------------------------------
    def resume(self) -> None:
        if self.checkpoint and self.checkpoint.exists():
            ck = load_checkpoint(self.checkpoint)
            self.engine.restore(ck)
            log.info("resumed from %s after round %d", self.checkpoint, ck.round)

    def run(self) -> list[RoundMetrics]:
        out: list[RoundMetrics] = []
        try:
            self.resume()
            self.client.start(timeout=None)
            if self.agg is not None:
                self.agg.start(timeout=None)
                self.agg.wait_for_workers()
            while not self._stop.is_set() and self.engine.round < self.rounds:
                need = self.engine.cfg.min_devices
                wait_until = time.monotonic() + self.wait_timeout
                while not self._stop.is_set():
                    self._pump(wait_until, self._enough_devices)
                    # Read presence already on its way (a burst of retained messages) before
                    # sampling: stopping at exactly min_devices sampled 7 of 10 online devices.
                    # It may also bring "offline" (Last Wills): then wait again.
                    self._pump(min(wait_until, time.monotonic() + self.settle))
                    if self._enough_devices() or time.monotonic() >= wait_until:
                        break
                if self._stop.is_set():
                    break
                if len(self.online) < need:
                    raise TimeoutError(
                        f"only {len(self.online)} of {need} devices online after "
                        f"{self.wait_timeout:.0f}s"
                    )
                tasks = self.engine.start_round(sorted(self.online))
                rnd = self.engine.open_round
                assert rnd is not None
                if self.signer is not None:  # signed when published (Ed25519 is deterministic)
                    tasks = tasks.map(
                        lambda d, t, s=self.signer, r=rnd: s.sign(self.topics.task(d), t, r)
                    )
                self._tasks = tasks
                if self.agg is not None:  # workers must know the round before any update
                    self.agg.open_round(rnd, self.engine.model_version, sorted(tasks))
                announce = json.dumps(
                    {
                        "round": rnd,
                        "model_version": self.engine.model_version,
                        "sampled": sorted(tasks),
                    }
                ).encode()
                if self.signer is not None:
                    announce = self.signer.sign(self.topics.round, announce, rnd)
                self.client.publish(self.topics.round, announce, retain=True)
                for dev, data in tasks.items():
                    self.client.publish(self.topics.task(dev), data)
                deadline = time.monotonic() + self.engine.cfg.round_timeout
                if self.agg is None:
                    self._pump(deadline, self.engine.all_answered)
                else:  # device presence waits in this service's inbox meanwhile
                    self.agg.pump(deadline, lambda: self._stop.is_set() or self.agg.all_reported())
                if self._stop.is_set():
                    break
                if self.agg is None:
                    m = self.engine.finish_round()
                else:
                    m = self.engine.finish_round_from_sums(self.agg.close_round())
                if self.checkpoint:
                    save_checkpoint(self.checkpoint, self.engine.checkpoint())
                self.metrics.write(m, self.rounds)
                self.client.publish(self.topics.metrics, json.dumps(m.to_dict()).encode())
                out.append(m)
            if not self._stop.is_set() and out:
                self._deliver_final_model()
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.client.stop()
            if self.agg is not None:
                self.agg.stop()
            self.finished.set()
        return out

    def _deliver_final_model(self) -> None:
        """Devices hold the weights of the last task they trained on; send every known
        device the model the run ended with (queued by the broker for offline ones)."""
        from edgefed.coordinator.final_model import final_model_message

        for d in sorted(self.engine.devices):
            msg = final_model_message(self.engine, d)
            if self.signer is not None:
                msg = self.signer.sign(self.topics.task(d), msg, self.engine.round)
            self.client.publish(self.topics.task(d), msg)
        log.info("final model %s sent to %d devices", self.engine.model_version,
                 len(self.engine.devices))  # fmt: skip

    def stop(self) -> None:
        self._stop.set()

    def start_thread(self) -> threading.Thread:
        def target() -> None:
            try:
                self.run()
            except Exception:
                log.exception("coordinator stopped with an error")

        t = threading.Thread(target=target, name="edgefed-coordinator", daemon=True)
        t.start()
        return t
