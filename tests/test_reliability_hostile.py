"""Reliability: hostile bytes on every topic the coordinator and the agents read.

In-process coordinator and two agents on a real mosquitto (so every log record is visible to
caplog), plus a forged "ghost" device that is sampled but never answers: hostile updates
on its topic therefore reach every layer (frame, multipart message, header fields, codec,
tensor validation) while the round is open. A raw paho client publishes, during round 1:

- frames: empty, random, truncated, a byte short, lying lengths, index >= count, a chunk
  count of 2^32-1, a claimed size of 1 TB, a real 5 MB frame over the 4 MB limit, a content
  hash mismatch, chunks disagreeing with earlier ones, and a flood of 60 partial messages
  claiming 4 MB each against an 8 MB reassembly budget;
- update messages (valid frames): not multipart, non-JSON header, deeply nested JSON, a part
  size running past the end, missing or mistyped fields, another device's id, random and
  truncated codec payloads, a correctly re-signed codec payload full of NaN;
- presence: non-JSON, wrong status, another device's id, a bad device id in the topic;
- tasks to both agents: not multipart, not a task, missing schema, a graph with a broken
  manifest, a path-traversal graph id, re-signed NaN global weights (v2), global weights
  in the retired wire format v1.

Each must be rejected with its reason in a log record; the service then completes both
rounds with both real devices, nothing crashes, and memory stays bounded (reassembly
buffers within their budget, process RSS growth small).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import struct
import threading
import zlib

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefed.codec import CompressionSpec, UpdateMeta, encode_update
from edgefed.codec.wire import _digest
from edgefed.transport.chunking import (
    _HEADER,
    HEADER_SIZE,
    MAGIC,
    ChunkError,
    Reassembler,
    split_message,
)
from edgefed.transport.message import pack, unpack

pytestmark = pytest.mark.system  # a real mosquitto

B = "edgefed/rel"
LIMIT, BUDGET = 4 * 1024 * 1024, 8 * 1024 * 1024


def frame(payload: bytes) -> bytes:
    return split_message(payload, max(len(payload), 1))[1][0]


def raw_frame(index: int, count: int, total: int, data: bytes, mid: bytes | None = None) -> bytes:
    digest = hashlib.sha256(b"x").digest()
    return _HEADER.pack(MAGIC, mid or os.urandom(16), index, count, total, digest) + data


def resign(payload: bytes) -> bytes:
    n = struct.unpack_from("<Q", payload)[0]
    header = json.loads(payload[8 : 8 + n])
    md = header["__metadata__"]
    body = payload[8 + n :]
    md["sha256"] = _digest(md["meta"], md["tensors"], [memoryview(body)])
    hb = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(hb)) + hb + body


def nan_payload(shapes: dict[str, tuple[int, ...]], meta: UpdateMeta) -> bytes:
    """A codec payload that passes the integrity check but carries NaN values."""
    t = {k: np.full(s, 0.25, np.float32) for k, s in shapes.items()}
    # the safetensors wire format v1 (decoders accept it alongside the compact v2)
    v1 = {"version": 1} if "version" in inspect.signature(encode_update).parameters else {}
    p = encode_update(t, meta, CompressionSpec.parse("none"), **v1)
    nan = np.array([np.nan], np.float32).tobytes()
    body0 = 8 + struct.unpack_from("<Q", p)[0]  # replace in the tensor body only
    body = p[body0:].replace(np.array([0.25], np.float32).tobytes(), nan)
    assert body != p[body0:]
    return resign(p[:body0] + body)


def nan_payload_v2(shapes: dict[str, tuple[int, ...]], meta: UpdateMeta) -> bytes:
    """The same in the compact v2 format (what devices read), with its CRC-32 recomputed."""
    t = {k: np.full(s, 0.25, np.float32) for k, s in shapes.items()}
    p = encode_update(t, meta, CompressionSpec.parse("none"))
    body = p[:-4].replace(np.array([0.25], np.float32).tobytes(), np.float32(np.nan).tobytes())
    assert body != p[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Attacker:
    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.tasks: dict[str, bytes] = {}  # first whole task message per device
        self.reasm = Reassembler()
        self.rounds: list[int] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker")
        self.c.on_connect = lambda c, u, f, rc, p: [
            c.subscribe(t, qos=1) for t in (f"{B}/task/+", f"{B}/round")
        ]
        self.c.on_message = self._on_message
        self.c.connect(host, int(port), 30)
        self.c.loop_start()

    def _on_message(self, c, u, msg) -> None:
        with self.cond:
            if msg.topic.endswith("/round"):
                self.rounds.append(json.loads(msg.payload[HEADER_SIZE:])["round"])
            else:
                try:  # it also hears its own hostile tasks
                    done = self.reasm.add(bytes(msg.payload))
                except ChunkError:
                    return
                if done is not None:
                    self.tasks.setdefault(msg.topic.rsplit("/", 1)[1], done[1])
            self.cond.notify_all()

    def wait(self, pred, timeout: float) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), "timed out"

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(30)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_hostile_bytes_on_every_topic_are_rejected_and_service_keeps_going(
    mosquitto, inproc_fleet, caplog
) -> None:
    caplog.set_level(logging.INFO)
    transport = {"max_message_bytes": LIMIT, "reassembly_memory": BUDGET, "chunk_size": 65536}
    fleet = inproc_fleet(
        mosquitto.url,
        ["dev-0", "dev-1"],
        rounds=2,
        min_devices=3,
        round_timeout=10.0,
        transport=transport,
    )
    shapes = fleet.model.shapes
    atk = Attacker(mosquitto.url)
    try:
        ghost = json.dumps({"status": "online", "device_id": "ghost"}).encode()
        atk.send(f"{B}/presence/ghost", frame(ghost), retain=True)
        fleet.start_agents()
        fleet.start_coordinator()
        atk.wait(lambda: 1 in atk.rounds and {"dev-0", "dev-1"} <= set(atk.tasks), 60)
        rss0 = rss_mb()
        expected: list[tuple[str, bytes, str]] = []

        # ---- frames (transport layer), on the update topic and on the task topics
        good = frame(b"hello world")
        big_mid = os.urandom(16)
        frames = [
            (b"", "shorter than the header"),
            (os.urandom(1000), "bad magic"),
            (good[:40], "shorter than the header"),
            (good[:-1], "expected 11"),
            (raw_frame(0, 2**32 - 1, 2**32, b"x"), "chunk count 4294967295 outside"),
            (raw_frame(5, 3, 30, b"x" * 10), "chunk index 5 >= count 3"),
            (raw_frame(0, 1, 2**40, b"x"), "exceeds limit"),
            (raw_frame(0, 50, 10, b"x"), "50 chunks for a message of 10 bytes"),
            (raw_frame(0, 1, 5, b"abcde"), "content hash mismatch"),
            (raw_frame(0, 1, LIMIT + 1024, os.urandom(LIMIT + 1024)), "exceeds limit"),
            (raw_frame(0, 4, 40, b"y" * 10, big_mid), ""),
            (raw_frame(1, 5, 50, b"y" * 10, big_mid), "disagrees with earlier chunks"),
        ]
        for topic in (f"{B}/update/dev-0", f"{B}/task/dev-1"):
            expected += [(topic, f, why) for f, why in frames]
        # reassembly flood: 60 partial messages of 4 MB (count 4096: 1 KB chunks)
        for _ in range(60):
            expected.append((f"{B}/update/ghost", raw_frame(0, 4096, LIMIT, b"z" * 1024), ""))
        expected.append((f"{B}/update/ghost", b"", "evicted: reassembly memory limit"))

        # ---- update messages on the sampled, silent ghost's topic (round 1 is open)
        def upd(header: dict, parts: dict | None = None) -> bytes:
            h = {
                "round": 1,
                "device_id": "ghost",
                "update_id": os.urandom(4).hex(),
                "num_samples": 10,
                **header,
            }
            return frame(pack({k: v for k, v in h.items() if v is not None}, parts))

        meta = UpdateMeta(1, "ghost", 10, "r0", kind="delta")
        real = encode_update(
            {k: np.zeros(s, np.float32) for k, s in shapes.items()},
            meta,
            CompressionSpec.parse("int8"),
        )
        hb = b'{"round":1,"parts":[["u",999]]}'
        updates = [
            (frame(os.urandom(300)), "invalid: header length"),
            (frame(struct.pack("<I", 4) + b"\xff\xfe{]"), "not UTF-8 JSON"),
            (frame(struct.pack("<I", 30000) + b"[" * 15000 + b"]" * 15000), "nested"),
            (frame(struct.pack("<I", len(hb)) + hb + b"abc"), "runs past the message end"),
            (upd({"update_id": None}), "lacks 'update_id'"),
            (upd({"round": "1"}), "'round' has type str"),
            (upd({"round": True}), "'round' has type bool"),
            (upd({"device_id": "dev-1"}), "!= topic device"),
            (upd({}, {"update": os.urandom(500)}), "dropped update from ghost: invalid"),
            (upd({}, {"update": real[:-9]}), "dropped update from ghost: invalid"),
            (upd({}, {}), "no update part"),
            (upd({}, {"update": nan_payload(shapes, meta)}), "NaN or Inf"),
        ]
        expected += [(f"{B}/update/ghost", f, why) for f, why in updates]

        # ---- presence
        presence = [
            (f"{B}/presence/x1", frame(b"\x00not json"), "invalid presence"),
            (f"{B}/presence/x2", frame(b'{"status": "maybe"}'), "online or offline"),
            (f"{B}/presence/x3", frame(b'{"status":"online","device_id":"x4"}'), "disagrees"),
            (f"{B}/presence/x5", frame(b"[" * 100000 + b"]" * 100000), "invalid presence"),
            (f"{B}/presence/bad id", frame(b'{"status":"online"}'), "invalid device id"),
        ]
        expected += presence

        # ---- tasks, derived from dev-0's real task
        th, tp = unpack(atk.tasks["dev-0"])
        th = dict(th, round=1000)  # beyond what the agent has done: it must look inside
        wmeta = UpdateMeta(1000, "coordinator", 0, "r0", kind="weights")
        tasks = [
            (frame(os.urandom(200)), "rejected task: header length"),
            (frame(pack(dict(th, type="update"), tp)), "rejected task: not a task"),
            (frame(pack({k: v for k, v in th.items() if k != "schema"}, tp)), "lacks 'schema'"),
            (
                frame(pack(dict(th, graph_sha="fff"), dict(tp, graph=b"g", manifest=b"{"))),
                "without a valid manifest",
            ),
            (frame(pack(dict(th, graph_sha="../../x"), tp)), "bad graph id"),
            (frame(pack(th, dict(tp, weights=nan_payload_v2(shapes, wmeta)))), "NaN or Inf"),
            # devices read v2 only: v1 is retired on the device side (codec/wire.py)
            (frame(pack(th, dict(tp, weights=nan_payload(shapes, wmeta)))), "v1 is retired"),
        ]
        for dev in ("dev-0", "dev-1"):
            expected += [(f"{B}/task/{dev}", f, why) for f, why in tasks]

        for topic, payload, _ in expected:
            atk.send(topic, payload)
        fleet.wait_finished(90)
        rss1 = rss_mb()
    finally:
        atk.close()

    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    missing = [(t, why) for t, _, why in expected if why and why not in text]
    assert not missing, f"not rejected with a logged reason: {missing}\n{text[-4000:]}"
    # no crash, and the real devices were unaffected: two full rounds
    h = fleet.engine.history
    assert [r["round"] for r in h] == [1, 2]
    for r in h:
        assert r["participants"] == 2 and r["sampled"] == 3, r
    assert all(a.worker.state.rounds_done == 2 for a in fleet.agents.values())
    assert "handler error" not in fleet.service.rejected
    # memory stayed bounded
    for c in [fleet.service.client, *(a.client for a in fleet.agents.values())]:
        assert c.reassembler.held_bytes <= BUDGET
    assert rss1 - rss0 < 100, (rss0, rss1)
