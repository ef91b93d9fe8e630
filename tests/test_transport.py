"""Transport pieces that need no broker: topics, URLs, config, framing, reassembly bounds,
multipart messages, deduplication, the flow window."""

from __future__ import annotations

import hashlib
import struct
import threading

import pytest

from edgefed.transport import (
    ChunkError,
    FlowWindow,
    MessageError,
    Reassembler,
    SeenSet,
    Topics,
    TransportConfig,
    pack,
    parse_broker_url,
    split_message,
    unpack,
)
from edgefed.transport.chunking import HEADER_SIZE, MAGIC
from edgefed.transport.client import backoff_delays


def test_topic_layout_and_parse() -> None:
    t = Topics("fleet-1")
    assert t.presence("dev-3") == "edgefed/fleet-1/presence/dev-3"
    assert t.update("d") == "edgefed/fleet-1/update/d"
    assert t.parse(t.task("d9")) == ("task", "d9")
    assert t.parse(t.round) == ("round", None)
    for bad in ("a/b", "+", "#", "", "x" * 65, "a b"):
        with pytest.raises(ValueError, match="invalid device id"):
            t.update(bad)
    with pytest.raises(ValueError, match="not under"):
        t.parse("other/fleet-1/update/d")
    with pytest.raises(ValueError, match="unknown topic"):
        t.parse("edgefed/fleet-1/update/d/extra")


def test_broker_url_parsing() -> None:
    u = parse_broker_url("mqtts://alice:s%40cret@broker.local")
    assert (u.host, u.port, u.tls, u.username, u.password) == (
        "broker.local",
        8883,
        True,
        "alice",
        "s@cret",
    )
    assert parse_broker_url("mqtt://127.0.0.1:1999").port == 1999
    for bad in ("http://x", "mqtt://", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(ValueError, match="broker URL"):
            parse_broker_url(bad)


def test_transport_config_validation() -> None:
    assert TransportConfig().inflight_window == 100
    with pytest.raises(ValueError, match="inflight_window"):
        TransportConfig(inflight_window=0)
    with pytest.raises(ValueError, match="protocol"):
        TransportConfig(protocol="4")
    with pytest.raises(ValueError, match="unknown"):
        TransportConfig.from_dict({"urll": "mqtt://x"})
    with pytest.raises(ValueError, match="cert_file"):
        TransportConfig(cert_file="/a")


def test_split_and_reassemble_out_of_order_with_redelivery() -> None:
    payload = bytes(range(256)) * 100 + b"tail"
    mid, frames = split_message(payload, 1000)
    assert len(frames) == 26
    r = Reassembler()
    out = None
    for f in [*reversed(frames[1:]), frames[3], frames[0]]:  # one redelivered chunk
        res = r.add(f)
        if res is not None:
            out = res
    assert out == (mid, payload)
    assert r.pending() == 0 and r.held_bytes == 0


def test_empty_message_round_trips() -> None:
    mid, frames = split_message(b"", 10)
    assert Reassembler().add(frames[0]) == (mid, b"")


def _frame(mid=b"m" * 16, index=0, count=1, total=3, digest=None, data=b"abc"):
    digest = digest or hashlib.sha256(data).digest()
    return struct.pack("<4s16sIIQ32s", MAGIC, mid, index, count, total, digest) + data


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"short", "shorter than the header"),
        (b"XXXX" + bytes(HEADER_SIZE), "bad magic"),
        (_frame(count=0), "chunk count 0"),
        (_frame(index=5, count=2, total=6, data=b"abc"), "index 5 >= count 2"),
        (_frame(total=10**12), "exceeds limit"),
        (_frame(count=2**31, total=2**31), "chunk count"),
        (_frame(data=b"abcd"), "carries 4 bytes"),
        (_frame(digest=b"\0" * 32), "hash mismatch"),
        (_frame(count=5, total=3), "5 chunks for a message of 3"),
    ],
)
def test_malformed_frames_rejected_with_reason(frame: bytes, reason: str) -> None:
    r = Reassembler(max_message_bytes=1 << 20)
    with pytest.raises(ChunkError, match=reason):
        r.add(frame)
    assert r.held_bytes == 0


def test_inconsistent_chunks_discard_partial() -> None:
    _, frames = split_message(b"x" * 100, 10, b"i" * 16)
    _, other = split_message(b"y" * 90, 10, b"i" * 16)
    r = Reassembler()
    assert r.add(frames[0]) is None
    with pytest.raises(ChunkError, match="disagrees"):
        r.add(other[1])
    assert r.pending() == 0 and r.held_bytes == 0


def test_reassembly_memory_bound_evicts_oldest_and_timeout_expires() -> None:
    r = Reassembler(max_message_bytes=1000, memory_limit=250, timeout=5.0)
    a = split_message(b"a" * 100, 10)[1]
    b = split_message(b"b" * 100, 10)[1]
    c = split_message(b"c" * 100, 10)[1]
    r.add(a[0], now=0.0)
    r.add(b[0], now=1.0)
    r.add(c[0], now=2.0)  # 300 > 250: the oldest (a) goes
    assert r.held_bytes == 200 and r.pending() == 2
    assert "memory limit" in r.evicted[0][1]
    r.add(split_message(b"d" * 5, 10)[1][0], now=100.0)  # single-chunk, triggers expiry
    assert r.pending() == 0 and r.held_bytes == 0
    assert sum("incomplete" in why for _, why in r.evicted) == 2
    with pytest.raises(ChunkError, match="reassembly memory"):
        Reassembler(max_message_bytes=1000, memory_limit=50).add(a[0])


def test_multipart_message_round_trip_and_hostile_input() -> None:
    data = pack({"round": 3, "kind": "task"}, {"weights": b"\x01\x02", "graph": b"g" * 7})
    header, parts = unpack(data)
    assert header == {"round": 3, "kind": "task"}
    assert parts == {"weights": b"\x01\x02", "graph": b"g" * 7}
    hostile = [
        (b"\x01", "no header length"),
        (struct.pack("<I", 2**31) + b"{}", "exceeds message"),
        (struct.pack("<I", 2) + b"\xff\xfe", "not UTF-8 JSON"),
        (struct.pack("<I", 2) + b"[]", "not a JSON object"),
        (pack({}, {"a": b"xy"})[:-1], "runs past"),
        (pack({}, {"a": b"xy"}) + b"!", "trailing"),
    ]
    lying = b'{"parts":[["a",-1]]}'
    hostile.append((struct.pack("<I", len(lying)) + lying, "bad part entry"))
    for raw, reason in hostile:
        with pytest.raises(MessageError, match=reason):
            unpack(raw)


def test_seen_set_is_bounded() -> None:
    s = SeenSet(capacity=3)
    assert s.check_and_add(("d", 1, "u"))
    assert not s.check_and_add(("d", 1, "u"))
    for k in range(10):
        s.check_and_add(k)
    assert len(s) == 3 and ("d", 1, "u") not in s


def test_flow_window_blocks_at_size_and_handles_early_acks() -> None:
    w = FlowWindow(2)
    assert w.acquire(0) and w.acquire(0)
    assert not w.acquire(0.01)
    w.register(1)
    w.release(2)  # the ack for mid 2 arrives before register(2)
    w.register(2)
    assert w.inflight == 1
    released = threading.Event()

    def later() -> None:
        released.set()
        w.release(1)

    t = threading.Thread(target=later)
    assert w.acquire(0)
    t.start()
    assert w.acquire(2.0) and released.is_set()
    t.join()


def test_backoff_has_jitter_and_cap() -> None:
    import random

    gen = backoff_delays(1.0, 8.0, random.Random(1))
    ds = [next(gen) for _ in range(8)]
    assert 0.5 <= ds[0] <= 1.0
    assert all(4.0 <= d <= 8.0 for d in ds[4:])
    other = backoff_delays(1.0, 8.0, random.Random(2))
    assert ds != [next(other) for _ in range(8)]
