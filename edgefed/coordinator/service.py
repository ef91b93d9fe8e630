"""The coordinator service: the round loop (:mod:`.loop`) over MQTT.

:class:`MqttCollector` is the fleet side of a round: it reads presence (retained, with Last
Will) until ``min_devices`` are online, publishes the round announcement and each sampled
device's task (signed when a key is configured), and hands every update to the engine's
intake until every sampled device answered or the deadline passed. With ``[sharding]``,
``edgefed.sharding.collector.ShardedCollector`` replaces it (aggregator workers read the
updates). :class:`CoordinatorService` runs the loop, checkpointing atomically and writing
metrics; restarted with the same checkpoint path, it resumes after the last finished round.
Every incoming message is handled inside a try: a malformed one is logged with its reason
and counted, and the service keeps going.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from edgefed.coordinator.loop import Collector, run_rounds
from edgefed.coordinator.metrics import MetricsWriter, RoundMetrics
from edgefed.coordinator.rounds import RoundEngine
from edgefed.coordinator.tasks import LazyTasks
from edgefed.protocol import Topics
from edgefed.security.downlink import DownlinkSigner
from edgefed.sharding.config import ShardingConfig
from edgefed.transport import TransportConfig
from edgefed.transport.client import Incoming, MqttClient

log = logging.getLogger(__name__)


class MqttCollector(Collector):
    def __init__(
        self,
        engine: RoundEngine,
        transport: TransportConfig,
        client_id: str | None = None,  # default edgefed-coordinator-<fleet>
        signer: DownlinkSigner | None = None,
        wait_timeout: float = 300.0,
        read_updates: bool = True,
    ) -> None:
        self.engine = engine
        self.wait_timeout = wait_timeout
        self.topics = Topics(transport.fleet, transport.topic_prefix)
        client_id = client_id or f"edgefed-coordinator-{transport.fleet}"
        subs = [self.topics.all_presence]
        if read_updates:
            subs.append(self.topics.all_updates)
        self.client = MqttClient(transport, client_id, subscriptions=subs)
        self._tasks: Mapping[str, bytes] = {}  # device -> (signed) task of the open round
        # Every downlink message is signed (topic-bound, round as anti-replay sequence) when a
        # key is configured; without one agents cannot tell our model from a forged one.
        self.signer = signer
        if signer is None:
            log.warning("no [security] signing_key: downlink messages are NOT signed (demo only)")
        self.online: set[str] = set()
        self._connections: dict[str, str] = {}  # device -> the connection its presence came on
        self.rejected: Counter[str] = Counter()
        self.stop_event = threading.Event()
        self.settle = 0.3  # seconds of extra presence reading before each round's sample

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()

    def start(self) -> None:
        self.client.start(timeout=None)

    def close(self) -> None:
        self.client.stop()

    # ---- inbox -----------------------------------------------------------------------
    def _handle(self, m: Incoming) -> None:
        try:
            kind, device = self.topics.parse(m.topic)
        except ValueError as e:
            self._reject(m.topic, "unknown topic", str(e))
            return
        if kind == "presence" and device is not None:
            self._presence(device, m.payload)
        elif kind == "update" and device is not None:
            self.engine.handle_update(device, m.payload)
        else:
            self._reject(m.topic, "coordinator does not read this topic")

    def _reject(self, topic: str, category: str, detail: str = "") -> None:
        log.warning("rejected message on %s: %s%s", topic, category, f": {detail}" * bool(detail))
        self.rejected[category] += 1

    def _presence(self, device: str, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict) or msg.get("status") not in ("online", "offline"):
                raise ValueError("status must be online or offline")
            if msg.get("device_id", device) != device:
                raise ValueError("device_id disagrees with the topic")
        except (ValueError, UnicodeDecodeError) as e:
            self._reject(f"presence/{device}", "invalid presence", str(e))
            return
        except RecursionError:  # deeply nested JSON
            self._reject(f"presence/{device}", "invalid presence", "JSON nested too deeply")
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
            msg.get("last_round"),
        )
        said = msg.get("connection")
        connection = said[:64] if isinstance(said, str) else None
        reconnected = (
            device not in self.online
            or connection is None  # an agent that does not say: assume it did
            or self._connections.get(device) != connection
        )
        if connection is not None:
            self._connections[device] = connection
        if device not in self.online:
            log.info("device %s online (%s)", device, caps.get("arch", "?"))
        self.online.add(device)
        if reconnected and self.engine.open_round is not None and device in self.engine.pending():
            # (re)connected mid-round: it may have lost its task. A re-announce on the same
            # connection (a new uplink measurement) gets nothing: re-sending the task there
            # made the device upload its stored update again, only to be dropped as a
            # duplicate -- seconds of a 10 kB/s link.
            self.resend([device])

    def pump(self, until: float, done: Callable[[], bool] = lambda: False) -> None:
        while not self.stopped and not done() and time.monotonic() < until:
            m = self.client.get(timeout=min(0.1, max(0.0, until - time.monotonic())))
            if m is not None:
                try:
                    self._handle(m)
                except Exception:  # never let one message end the service
                    log.exception("error handling message on %s", m.topic)
                    self.rejected["handler error"] += 1

    def resend(self, devices: list[str]) -> None:
        """Send devices their task of the open round again; the agent answers a repeated
        task with its stored update (same update id)."""
        for d in devices:
            if d in self._tasks:
                self.client.publish(self.topics.task(d), self._tasks[d])

    def _enough(self) -> bool:
        return len(self.online) >= self.engine.cfg.min_devices

    # ---- the round -------------------------------------------------------------------
    def wait_online(self, need: int) -> list[str]:
        wait_until = time.monotonic() + self.wait_timeout
        while not self.stopped:
            had_enough = self._enough()
            self.pump(wait_until, self._enough)
            # Read presence already on its way (a burst of retained messages) before
            # sampling: stopping at exactly min_devices sampled 7 of 10 online devices.
            # It may also bring "offline" (Last Wills): then wait again. Only when this call
            # had to wait for devices: between rounds the intake already read presence, so
            # what remains is what has arrived (a 0.3 s pause per round cost 30 s per 100).
            settle = 0.02 if had_enough else self.settle
            self.pump(min(wait_until, time.monotonic() + settle))
            if self._enough() or time.monotonic() >= wait_until:
                break
        if not self.stopped and len(self.online) < need:
            raise TimeoutError(
                f"only {len(self.online)} of {need} devices online after {self.wait_timeout:.0f}s"
            )
        return sorted(self.online)

    def online_now(self) -> list[str]:
        self.pump(time.monotonic() + 0.02, self.engine.buffer_full)  # what already arrived
        return sorted(self.online)

    def send(self, tasks: Mapping[str, bytes]) -> None:
        rnd = self.engine.open_round
        assert rnd is not None
        if self.signer is not None:  # signed when published (Ed25519 is deterministic)
            tasks = tasks.map(  # type: ignore[attr-defined]
                lambda d, t, s=self.signer: s.sign(
                    self.topics.task(d), t, self.engine.task_round(d) or 0
                )
            )
        if self.engine.asynchronous:  # tasks go out one by one; no round to announce
            if not isinstance(self._tasks, LazyTasks):
                self._tasks = LazyTasks({})
            self._tasks.update(tasks)  # type: ignore[arg-type]
            for dev in tasks:
                self.client.publish(self.topics.task(dev), tasks[dev])
            return
        self._tasks = tasks
        announce = self.engine.announcement().to_json()
        if self.signer is not None:
            announce = self.signer.sign(self.topics.round, announce, rnd)
        self.client.publish(self.topics.round, announce, retain=True)
        for dev, data in tasks.items():
            self.client.publish(self.topics.task(dev), data)

    def collect(self, deadline: float) -> None:
        self.pump(deadline, lambda: self.engine.collect_done(self.online))

    def published(self, m: RoundMetrics) -> None:
        self.client.publish(self.topics.metrics, json.dumps(m.to_dict()).encode())

    def deliver_final_model(self) -> None:
        """Devices hold the weights of the last task they trained on; send every known
        device the model the run ended with (queued by the broker for offline ones)."""
        from edgefed.coordinator.final_model import final_model_messages

        for d, msg in final_model_messages(self.engine):
            if self.signer is not None:
                msg = self.signer.sign(self.topics.task(d), msg, self.engine.downlink_seq)
            self.client.publish(self.topics.task(d), msg)
        log.info(
            "final model %s sent to %d devices", self.engine.model_version, len(self.engine.devices)
        )


class CoordinatorService:
    """The coordinator process: :func:`~edgefed.coordinator.loop.run_rounds` over MQTT."""

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
        client_id = client_id or f"edgefed-coordinator-{transport.fleet}"
        self.collector: MqttCollector
        if sharding is None:
            self.collector = MqttCollector(engine, transport, client_id, signer, wait_timeout)
        else:  # the workers read the updates ($share/...); docs/scale-out.md
            from edgefed.sharding.collector import ShardedCollector

            self.collector = ShardedCollector(
                engine, transport, sharding, client_id, signer, wait_timeout,
                sharding_transport or transport,
            )  # fmt: skip
        self.finished = threading.Event()
        self.error: BaseException | None = None

    # the collector's state, as the service always exposed it
    @property
    def client(self) -> MqttClient:
        return self.collector.client

    @property
    def online(self) -> set[str]:
        return self.collector.online

    @property
    def rejected(self) -> Counter[str]:
        return self.collector.rejected

    def run(self) -> list[RoundMetrics]:
        try:
            return run_rounds(
                self.engine, self.collector, self.rounds, self.checkpoint, self.metrics
            )
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.finished.set()

    def stop(self) -> None:
        self.collector.stop_event.set()

    def start_thread(self) -> threading.Thread:
        def target() -> None:
            try:
                self.run()
            except Exception:
                log.exception("coordinator stopped with an error")

        t = threading.Thread(target=target, name="edgefed-coordinator", daemon=True)
        t.start()
        return t
