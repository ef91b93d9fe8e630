"""The mosquitto fixture itself: a real broker that accepts a real paho client."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

pytestmark = pytest.mark.system  # a real mosquitto


def test_mosquitto_round_trip(mosquitto) -> None:
    got = threading.Event()
    payloads: list[bytes] = []

    def on_message(client, userdata, msg) -> None:
        payloads.append(msg.payload)
        got.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fixture-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("edgefed/fixture", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fixture-pub")
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        for _ in range(50):
            pub.publish("edgefed/fixture", b"hello", qos=1).wait_for_publish(5)
            if got.wait(0.1):
                break
        assert payloads and payloads[0] == b"hello"
    finally:
        for c in (sub, pub):
            c.loop_stop()
            c.disconnect()
