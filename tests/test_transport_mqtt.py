"""MqttClient against a real mosquitto (MQTT 5) and the embedded amqtt broker (3.1.1)."""

from __future__ import annotations

import json
import time

import pytest
from harness.wait import wait_until

from edgefed.transport import Topics, TransportConfig, split_message
from edgefed.transport.client import MqttClient

pytestmark = pytest.mark.system  # real brokers

BROKERS = ["mosquitto", "embedded_broker"]


def _cfg(url: str, **kw) -> TransportConfig:
    return TransportConfig(url=url, chunk_size=4096, backoff_min=0.05, backoff_max=0.5, **kw)


def _drain(c: MqttClient, n: int, timeout: float = 10.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        m = c.get(0.1)
        if m is not None:
            out.append(m)
    return out


@pytest.mark.parametrize("broker", BROKERS)
def test_chunked_round_trip_protocol_and_window(broker: str, request) -> None:
    b = request.getfixturevalue(broker)
    t = Topics("t1")
    sub = MqttClient(_cfg(b.url), "coord", [t.all_updates]).start()
    pub = MqttClient(_cfg(b.url, inflight_window=8), "dev-1").start()
    try:
        assert sub.protocol_name == ("5" if broker == "mosquitto" else "3.1.1")
        big = bytes(range(256)) * 1000  # 256 KB -> 63 chunks through a window of 8
        mid = pub.publish(t.update("dev-1"), big)
        pub.publish(t.update("dev-1"), b"small")
        assert pub.flush(10)
        assert pub.window.peak <= 8
        got = _drain(sub, 2)
        assert [g.payload for g in got] == [big, b"small"]
        assert got[0].message_id == mid and got[0].topic == t.update("dev-1")
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.parametrize("broker", BROKERS)
def test_malformed_and_duplicate_frames(broker: str, request) -> None:
    b = request.getfixturevalue(broker)
    t = Topics("t2")
    sub = MqttClient(_cfg(b.url), "coord", [t.all_updates]).start()
    pub = MqttClient(_cfg(b.url), "dev-2").start()
    try:
        topic = t.update("dev-2")
        pub.publish_frame(topic, b"garbage that is not a frame")
        _, frames = split_message(b"once", 4096, b"u" * 16)
        pub.publish_frame(topic, frames[0])
        pub.publish_frame(topic, frames[0])  # QoS 1 redelivery of the same message
        pub.publish(topic, b"after")
        got = _drain(sub, 2)
        assert [g.payload for g in got] == [b"once", b"after"]
        assert sub.get(0.3) is None  # the duplicate never shows up
        assert any("shorter than the header" in why for _, why in sub.rejected)
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.parametrize("broker", BROKERS)
def test_persistent_session_gets_messages_sent_while_offline(broker: str, request) -> None:
    b = request.getfixturevalue(broker)
    t = Topics("t3")
    dev = MqttClient(_cfg(b.url), "dev-3", [t.task("dev-3")]).start()
    dev.stop()  # offline; session kept by the broker
    coord = MqttClient(_cfg(b.url), "coord").start()
    try:
        coord.publish(t.task("dev-3"), b"task-payload" * 1000)  # chunked
        assert coord.flush(10)
        back = MqttClient(_cfg(b.url), "dev-3", [t.task("dev-3")]).start()
        try:
            got = _drain(back, 1)
            assert got and got[0].payload == b"task-payload" * 1000
        finally:
            back.stop()
    finally:
        coord.stop()


@pytest.mark.parametrize("broker", BROKERS)
def test_last_will_marks_device_offline(broker: str, request) -> None:
    b = request.getfixturevalue(broker)
    t = Topics("t4")
    coord = MqttClient(_cfg(b.url), "coord", [t.all_presence]).start()
    will = json.dumps({"status": "offline"}).encode()
    dev = MqttClient(_cfg(b.url, keepalive=5), "dev-4", will=(t.presence("dev-4"), will)).start()
    try:
        dev.publish(t.presence("dev-4"), b'{"status":"online"}', retain=True)
        assert dev.flush(5)
        dev.kill()  # no DISCONNECT: the broker must publish the will
        got = _drain(coord, 2, timeout=20)
        assert [json.loads(g.payload)["status"] for g in got] == ["online", "offline"]
    finally:
        coord.stop()


def test_reconnects_after_broker_restart(mosquitto) -> None:
    t = Topics("t5")
    sub = MqttClient(_cfg(mosquitto.url), "coord", [t.all_updates]).start()
    pub = MqttClient(_cfg(mosquitto.url), "dev-5").start()
    try:
        mosquitto.stop()
        wait_until(lambda: not pub.connected.is_set(), 10, "the client noticing the broker left")
        mosquitto.start()
        assert pub.connected.wait(10) and sub.connected.wait(10)
        assert sub.connects >= 2
        pub.publish(t.update("dev-5"), b"after-restart")
        got = _drain(sub, 1)
        assert got and got[0].payload == b"after-restart"
    finally:
        pub.stop()
        sub.stop()


def test_tls_and_credentials_from_config(secured_mosquitto) -> None:
    """TLS + username/password from TransportConfig against the issue-7 secured broker."""
    sm = secured_mosquitto
    pw = sm.written.passwords
    base = dict(
        url=f"mqtts://127.0.0.1:{sm.tls_port}",
        fleet="farm",
        ca_file=str(sm.written.ca_cert),
        backoff_min=0.05,
        backoff_max=0.5,
    )
    t = Topics("farm")
    coord = MqttClient(
        TransportConfig(**base, username="coordinator", password=pw["coordinator"]),
        "coordinator",
        [t.all_updates],
    ).start(timeout=15)
    dev = MqttClient(
        TransportConfig(**base, username="dev-0", password=pw["dev-0"]), "dev-0"
    ).start(timeout=15)
    try:
        assert coord.protocol_name == "5"
        dev.publish(t.update("dev-0"), b"over tls" * 100)
        got = _drain(coord, 1)
        assert got and got[0].payload == b"over tls" * 100
    finally:
        dev.stop()
        coord.stop()
    wrong = MqttClient(TransportConfig(**base, username="dev-1", password="wrong"), "dev-1")
    with pytest.raises(TimeoutError, match="no connection"):
        wrong.start(timeout=2)
