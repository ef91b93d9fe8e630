"""Reliability: a QoS 1 update delivered twice is aggregated once.

In-process coordinator service and two agents on a real mosquitto, plus a "ghost" device
whose (forged) presence keeps round 1 open until its deadline. A raw paho client captures
dev-0's update and task frames as they cross the broker and re-publishes them:

1. the same frame bytes again (what a QoS 1 redelivery looks like to the receiver: MQTT does
   not forward the DUP flag, so the subscriber sees the same bytes twice) -> dropped by the
   transport's message-id dedupe;
2. the same update message re-framed under a new frame id (a sender that resent after a
   crash) -> reaches the round engine, dropped as "duplicate" by (device, round, update id);
3. dev-0's task re-framed under a new id (a redelivered task) -> the agent does not train
   again but resends its stored update, which the coordinator drops as a duplicate.

The aggregate is then compared with FedAvg computed by the test from the two captured
updates: equal, so each was counted exactly once.
"""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from harness.wait import wait_until

from edgefed.codec import decode_update
from edgefed.transport.chunking import HEADER_SIZE, split_message
from edgefed.transport.message import unpack

pytestmark = pytest.mark.system  # a real mosquitto


class Capture:
    def __init__(self, url: str, topics: list[str]) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.frames: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="capture")
        self.c.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in topics]
        self.c.on_message = self._on_message
        self.c.connect(host, int(port), 30)
        self.c.loop_start()

    def _on_message(self, c, u, msg) -> None:
        with self.cond:
            self.frames.append((msg.topic, bytes(msg.payload)))
            self.cond.notify_all()

    def first(self, topic: str, timeout: float) -> bytes:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(t == topic for t, _ in self.frames), timeout)
            assert ok, f"nothing on {topic} in {timeout}s"
            return next(p for t, p in self.frames if t == topic)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_update_delivered_twice_is_aggregated_once(mosquitto, inproc_fleet, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="edgefed")
    fleet = inproc_fleet(
        mosquitto.url, ["dev-0", "dev-1"], rounds=1, min_devices=3, round_timeout=6.0
    )
    base = "edgefed/rel"
    cap = Capture(mosquitto.url, [f"{base}/update/+", f"{base}/task/+"])
    try:
        ghost = json.dumps({"status": "online", "device_id": "ghost"}).encode()
        cap.publish(f"{base}/presence/ghost", split_message(ghost, 1 << 16)[1][0], retain=True)
        initial = {k: v.copy() for k, v in fleet.engine.params.items()}
        fleet.start_agents()
        fleet.start_coordinator()
        upd_frame = cap.first(f"{base}/update/dev-0", 30)
        task_frame = cap.first(f"{base}/task/dev-0", 5)
        # 1. identical frame again
        cap.publish(f"{base}/update/dev-0", upd_frame)
        # 2. the same update message under a new frame id
        cap.publish(f"{base}/update/dev-0", split_message(upd_frame[HEADER_SIZE:], 1 << 20)[1][0])
        # 3. the task again under a new frame id: the agent must resend, not retrain
        cap.publish(f"{base}/task/dev-0", split_message(task_frame[HEADER_SIZE:], 1 << 20)[1][0])
        d1_frame = cap.first(f"{base}/update/dev-1", 30)
        fleet.wait_finished(60)
        assert fleet.service.error is None
        # the agent resent its stored update (same update id) once, and trained once
        wait_until(lambda: fleet.agents["dev-0"].updates_sent >= 2, 5, "dev-0's resend")
        assert fleet.agents["dev-0"].updates_sent == 2
        assert fleet.agents["dev-0"].worker.state.rounds_done == 1
    finally:
        cap.close()

    h = fleet.engine.history
    assert len(h) == 1 and h[0]["sampled"] == 3 and h[0]["participants"] == 2
    reasons = [(d["device"], d["reason"]) for d in h[0]["drop_log"]]
    dups = [r for d, r in reasons if d == "dev-0" and r.startswith("duplicate")]
    assert len(dups) == 2, reasons  # the re-framed copy and the agent's resend
    assert ("ghost", "deadline: no update before the round closed") in reasons
    assert len(reasons) == 3, reasons  # the identical frame never reached the engine
    assert any("duplicate delivery" in r.getMessage() for r in caplog.records)

    # FedAvg of the two captured updates, computed here: equal to the coordinator's result
    ups = []
    for frame in (upd_frame, d1_frame):
        header, parts = unpack(frame[HEADER_SIZE:])
        u = decode_update(parts["update"], fleet.engine.schema)
        ups.append((header["num_samples"], u.to_dense()))
    total = sum(n for n, _ in ups)
    for k, v in initial.items():
        expect = v + sum(n * d[k] for n, d in ups) / total
        np.testing.assert_allclose(fleet.engine.params[k], expect, rtol=1e-5, atol=1e-6)
    # counted twice would be (2*n0*d0 + n1*d1)/(2*n0 + n1): must differ from the result
    n0, d0 = ups[0]
    n1, d1 = ups[1]
    k = next(iter(initial))
    twice = initial[k] + (2 * n0 * d0[k] + n1 * d1[k]) / (2 * n0 + n1)
    assert not np.allclose(fleet.engine.params[k], twice, rtol=1e-5, atol=1e-6)
