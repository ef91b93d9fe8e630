"""A paho-mqtt 2.x client wrapper with the behaviour a fleet needs.

- MQTT 5 when the broker speaks it, else 3.1.1 (``protocol="auto"``: a CONNACK "unsupported
  protocol version" switches to 3.1.1 once, as amqtt answers).
- Persistent sessions: MQTT 5 ``clean_start=False`` with a session expiry, 3.1.1
  ``clean_session=False``, QoS 1 subscriptions renewed in every CONNACK, so messages for a
  device that is offline are queued by the broker and delivered when it returns.
- Reconnect with exponential backoff AND jitter (paho's own backoff has none, so a fleet
  would reconnect in lockstep after a broker restart): the network loop is ours.
- Every publish is framed and, above ``chunk_size``, chunked (:mod:`.chunking`), and passes a
  flow-control window of unacknowledged QoS 1 messages (:mod:`.flow`).
- Received frames are reassembled, deduplicated by message id (QoS 1 redelivery) and put
  on a bounded inbox queue that the service drains in its own thread, so slow work (training,
  aggregation) never blocks keep-alives. A malformed frame is logged with its reason and
  counted in :attr:`rejected`; the client keeps going.
- The uplink rate is measured from PUBACK timing (:mod:`.uplink`, :attr:`uplink`); publishes
  resent after a reconnect (unacknowledged when the link dropped) are counted in
  :attr:`resent_publishes` / :attr:`resent_bytes`.

When no username is configured the client id is sent as the username (no password):
amqtt keeps no offline messages for anonymous sessions, and mosquitto with
``allow_anonymous true`` accepts it unchanged.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefed.transport.chunking import ChunkError, Reassembler, split_message
from edgefed.transport.config import TransportConfig
from edgefed.transport.dedupe import SeenSet
from edgefed.transport.flow import FlowWindow
from edgefed.transport.uplink import UplinkMeter

log = logging.getLogger(__name__)

UNSUPPORTED_PROTOCOL = 132  # MQTT 5 CONNACK reason code 0x84


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    message_id: bytes
    retained: bool


def backoff_delays(minimum: float, maximum: float, rng: random.Random | None = None):
    """Exponential backoff with "equal jitter": each wait is uniform in [d/2, d] and d doubles
    up to ``maximum``. Spreads a fleet's reconnects while keeping a floor."""
    rng = rng or random.Random()
    d = minimum
    while True:
        yield d / 2 + rng.uniform(0, d / 2)
        d = min(d * 2, maximum)


class MqttClient:
    def __init__(
        self,
        config: TransportConfig,
        client_id: str,
        subscriptions: list[str] | None = None,
        will: tuple[str, bytes] | None = None,
        inbox_size: int = 10_000,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscriptions = list(subscriptions or [])
        self.will = will
        self.inbox: queue.Queue[Incoming] = queue.Queue(inbox_size)
        self.window = FlowWindow(config.inflight_window)
        self.reassembler = Reassembler(
            config.max_message_bytes, config.reassembly_memory, config.reassembly_timeout
        )
        self.seen = SeenSet(100_000)
        self.rejected: deque[tuple[str, str]] = deque(maxlen=1000)
        # (topic, reason) of our own publishes the broker refused (MQTT 5 PUBACK >= 0x80, e.g.
        # 0x87 not authorized by the ACL); MQTT 3.1.1 brokers drop those silently.
        self.refused: deque[tuple[str, str]] = deque(maxlen=1000)
        self._topic_of_mid: dict[int, str] = {}
        self.connected = threading.Event()
        # Set once the broker has acknowledged every subscription of the current connection:
        # start() waits for it, so nothing published right after start() can be missed.
        self.subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self.protocol = mqtt.MQTTv311 if config.protocol == "3.1.1" else mqtt.MQTTv5
        self.bytes_out = 0
        self.bytes_in = 0
        self.connects = 0
        self.uplink = UplinkMeter()
        self.resent_publishes = 0  # frames paho resent after a reconnect (not acknowledged)
        self.resent_bytes = 0
        self._stop = threading.Event()
        self._fallback = False
        self._probed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._client = self._make_client()

    # ---- setup -----------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        cfg = self.config
        v5 = self.protocol == mqtt.MQTTv5
        kwargs = {} if v5 else {"clean_session": False}
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            **kwargs,
        )
        user = cfg.username or cfg.broker.username or self.client_id
        password = cfg.password or cfg.broker.password
        c.username_pw_set(user, password)
        if cfg.use_tls:
            c.tls_set(
                ca_certs=cfg.ca_file,
                certfile=cfg.cert_file,
                keyfile=cfg.key_file,
                cert_reqs=ssl.CERT_REQUIRED,
            )
            c.tls_insecure_set(cfg.tls_insecure)
        if self.will is not None:
            topic, payload = self.will
            _, frames = split_message(payload, max(len(payload), 1))
            c.will_set(topic, frames[0], qos=1, retain=True)
        c.max_inflight_messages_set(0)  # our window limits in-flight; paho must not queue too
        c.max_queued_messages_set(0)
        # Only the network thread may touch the socket: without an external-loop write hook,
        # paho's publish() writes from the caller's thread while _run() reads, and two threads
        # on one SSL object corrupt TLS ("bad record mac", issue 7). With the hook set, publish
        # only queues and wakes select(); _run() does all writes.
        c.on_socket_register_write = lambda client, userdata, sock: None
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        return c

    def _connect(self) -> None:
        cfg = self.config
        b = cfg.broker
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry
            self._client.connect(b.host, b.port, cfg.keepalive, clean_start=False, properties=props)
        else:
            self._client.connect(b.host, b.port, cfg.keepalive)

    def _probe_protocol(self, timeout: float = 5.0) -> int:
        """Ask the broker with a minimal MQTT 5 CONNECT (no properties, no credentials) whether
        it speaks MQTT 5. A full v5 CONNECT with properties and a username confuses amqtt
        (it stalls instead of refusing), hence the separate probe. Any CONNACK other than
        "unsupported protocol version" (even "not authorized") means MQTT 5."""
        answer: list[int] = []
        probe = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_id}-probe"[:64],
            protocol=mqtt.MQTTv5,
        )
        if self.config.use_tls:
            probe.tls_set(
                ca_certs=self.config.ca_file,
                certfile=self.config.cert_file,
                keyfile=self.config.key_file,
            )
            probe.tls_insecure_set(self.config.tls_insecure)
        probe.on_connect = lambda c, u, f, rc, p: answer.append(rc.value)
        b = self.config.broker
        probe.connect(b.host, b.port, 10)
        deadline = time.monotonic() + timeout
        while not answer and time.monotonic() < deadline:
            if probe.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        probe.disconnect()
        probe.loop(0.01)
        v5 = bool(answer) and answer[0] != UNSUPPORTED_PROTOCOL
        return mqtt.MQTTv5 if v5 else mqtt.MQTTv311

    # ---- paho callbacks (network thread) ---------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            if reason_code.value == UNSUPPORTED_PROTOCOL and self.config.protocol == "auto":
                self._fallback = True
            else:
                log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            return
        self.subscribed.clear()
        self._pending_subs = set()
        for topic in self.subscriptions:
            _, mid = client.subscribe(topic, qos=1)
            self._pending_subs.add(mid)
        if not self._pending_subs:
            self.subscribed.set()
        if self.connects:
            n, size = self.uplink.resumed()
            self.resent_publishes += n
            self.resent_bytes += size
            if n:
                log.info(
                    "%s: reconnected; resending %d unacknowledged publishes (%d bytes)",
                    self.client_id, n, size,
                )  # fmt: skip
        self.connects += 1
        self.connected.set()
        log.debug("%s connected (MQTT %s)", self.client_id, self.protocol_name)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log.warning("%s: subscription refused by the broker: %s", self.client_id, rc)
        self._pending_subs.discard(mid)
        if not self._pending_subs:
            self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self.uplink.interrupted()
        if not self._stop.is_set():
            log.info("%s disconnected: %s", self.client_id, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        topic = self._topic_of_mid.pop(mid, "(topic not recorded)")
        if reason_code.is_failure:
            log.error(
                "%s: broker refused our publish on %s: %s", self.client_id, topic, reason_code
            )
            self.refused.append((topic, str(reason_code)))
        self.uplink.acked(mid)
        self.window.release(mid)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.bytes_in += len(msg.payload)
        try:
            done = self.reassembler.add(msg.payload)
        except ChunkError as e:
            self._reject(msg.topic, e.reason)
            return
        finally:
            for mid, reason in self.reassembler.evicted:
                self._reject(msg.topic, f"message {mid.hex()[:8]} dropped: {reason}")
            self.reassembler.evicted.clear()
        if done is None:
            return
        mid, payload = done
        if not self.seen.check_and_add((msg.topic, mid)):
            log.debug(
                "%s: duplicate delivery of %s on %s ignored", self.client_id, mid.hex(), msg.topic
            )
            return
        self.inbox.put(Incoming(msg.topic, payload, mid, bool(msg.retain)))

    def _reject(self, topic: str, reason: str) -> None:
        log.warning("%s: rejected message on %s: %s", self.client_id, topic, reason)
        self.rejected.append((topic, reason))

    # ---- network loop ----------------------------------------------------------------
    def _run(self) -> None:
        delays = backoff_delays(self.config.backoff_min, self.config.backoff_max)
        sock_open = False
        while not self._stop.is_set():
            if not sock_open:
                try:
                    if self.config.protocol == "auto" and not self._probed:
                        self.protocol = self._probe_protocol()
                        self._probed = True
                        with self._lock:
                            self._client = self._make_client()
                    self._connect()
                    sock_open = True
                except (OSError, ssl.SSLError) as e:
                    wait = next(delays)
                    log.info("%s: connect failed (%s); retry in %.1fs", self.client_id, e, wait)
                    self._stop.wait(wait)
                    continue
            rc = self._client.loop(timeout=0.1)
            if self._fallback:
                self._fallback = False
                log.info("%s: broker speaks MQTT 3.1.1 only; switching", self.client_id)
                with self._lock:
                    self._client.disconnect()
                    self.protocol = mqtt.MQTTv311
                    self._client = self._make_client()
                sock_open = False
                continue
            if rc != mqtt.MQTT_ERR_SUCCESS:
                sock_open = False
                self.connected.clear()
                self.uplink.interrupted()
                if self._stop.is_set():
                    break
                wait = next(delays)
                log.info("%s: connection lost (rc=%s); retry in %.1fs", self.client_id, rc, wait)
                self._stop.wait(wait)
            elif self.connected.is_set():
                delays = backoff_delays(self.config.backoff_min, self.config.backoff_max)
        with self._lock:  # send what stop() queued (the DISCONNECT) from this thread
            if sock_open and self._client.want_write():
                self._client.loop_write()

    @property
    def protocol_name(self) -> str:
        return "5" if self.protocol == mqtt.MQTTv5 else "3.1.1"

    def start(self, timeout: float | None = 30.0) -> MqttClient:
        """Start the network thread; wait up to ``timeout`` for the first CONNACK and the
        SUBACKs of every subscription (None: don't wait)."""
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        if deadline is not None and not (
            self.connected.wait(timeout)
            and self.subscribed.wait(max(0.0, deadline - time.monotonic()))
        ):
            self.stop()
            raise TimeoutError(
                f"{self.client_id}: no connection to {self.config.url} in {timeout}s"
            )
        return self

    def stop(self, flush: float = 5.0) -> None:
        """Wait up to ``flush`` s for unacknowledged publishes, then disconnect cleanly.

        A clean DISCONNECT suppresses the Last Will; use :meth:`kill` to simulate a crash."""
        if self._thread is None:
            return
        if self.connected.is_set():
            self.window.wait_empty(flush)
        self._stop.set()
        with self._lock:
            self._client.disconnect()
        self._thread.join(timeout=10)
        self._thread = None

    def kill(self) -> None:
        """Drop the socket without DISCONNECT (the broker then publishes the Last Will)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    # ---- publishing ------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        message_id: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> bytes:
        """Frame/chunk ``payload`` and publish it at QoS 1 through the window; returns the
        message id. Blocks while the window is full (up to ``timeout`` per chunk)."""
        mid, frames = split_message(payload, self.config.chunk_size, message_id)
        if retain and len(frames) > 1:
            raise ValueError("retained messages must fit in one chunk")
        for frame in frames:
            self.publish_frame(topic, frame, retain=retain, timeout=timeout)
        return mid

    def publish_frame(
        self, topic: str, frame: bytes, *, retain: bool = False, timeout: float | None = 60.0
    ) -> None:
        """Publish raw bytes at QoS 1 through the window (also used by hostile-input tests)."""
        if not self.window.acquire(timeout):
            raise TimeoutError(f"{self.client_id}: publish window full for {timeout}s")
        try:
            with self._lock:
                info = self._client.publish(topic, frame, qos=1, retain=retain)
        except Exception:
            self.window.cancel()
            raise
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.window.cancel()
            raise OSError(f"{self.client_id}: publish failed: {mqtt.error_string(info.rc)}")
        # NO_CONN: paho keeps the QoS 1 message and sends it after the reconnect.
        if len(self._topic_of_mid) > 10_000:  # acks that came before we recorded the topic
            self._topic_of_mid.clear()
        self._topic_of_mid[info.mid] = topic
        self.window.register(info.mid)
        self.uplink.sent(info.mid, len(frame))
        self.bytes_out += len(frame)

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every publish has been acknowledged by the broker."""
        return self.window.wait_empty(timeout)

    def get(self, timeout: float | None = None) -> Incoming | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
