"""Sharded aggregation end to end: a real mosquitto, 3 aggregator worker PROCESSES
(``python -m edgefed aggregator``), the coordinator's side in the test process, and a
simulated fleet publishing real compressed updates (topk:0.01+int8 through the codec).

Checked: the merged sums equal one process's Accumulator over the same updates (float
summation-order tolerance), every update counted exactly once even when delivered twice,
a worker SIGKILLed mid-round (updates redelivered by the devices, or dropped and reported),
and forged partials rejected with a reason while the round still ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from harness.processes import stop_processes

from edgefed.codec import (
    Accumulator,
    CompressionSpec,
    ModelSchema,
    UpdateMeta,
    decode_update,
    encode_update,
)
from edgefed.sharding import AggregatorWorker, ShardedAggregation, ShardingConfig, WorkerConfig
from edgefed.sharding.partial import decode_partial, encode_partial
from edgefed.transport import Topics, TransportConfig
from edgefed.transport.client import MqttClient
from edgefed.transport.message import pack

pytestmark = pytest.mark.system  # mosquitto + aggregator worker processes

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ModelSchema({"fc1.weight": (256, 512), "fc1.bias": (256,), "fc2.weight": (10, 256)})
SPEC = CompressionSpec.parse("topk:0.01+int8")
VERSION = "r0"


def make_update(rnd: int, dev: str, seed: int, tensors: tuple[str, ...] | None = None) -> bytes:
    """One device's update message exactly as device_agent builds it (header + codec bytes)."""
    rng = np.random.default_rng(seed)
    names = tensors or tuple(SCHEMA)
    delta = {n: rng.standard_normal(SCHEMA[n]).astype(np.float32) for n in names}
    num = int(rng.integers(5, 200))
    meta = UpdateMeta(rnd, dev, num, VERSION, kind="delta")
    payload = encode_update(delta, meta, SPEC)
    header = {"type": "update", "round": rnd, "device_id": dev, "update_id": f"u{seed}",
              "model_version": VERSION, "num_samples": num}  # fmt: skip
    return pack(header, {"update": payload})


def reference(messages: list[bytes]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Single-process aggregation of the same updates (each message counted once)."""
    from edgefed.transport.message import unpack

    acc = Accumulator(SCHEMA)
    for m in messages:
        h, parts = unpack(m)
        acc.add(decode_update(parts["update"], SCHEMA), weight=float(h["num_samples"]))
    return acc.result()


def assert_equal_aggregate(res, messages: list[bytes]) -> None:
    ref_s, ref_w = reference(messages)
    for n in SCHEMA:
        scale = float(np.abs(ref_s[n]).max()) or 1.0
        np.testing.assert_allclose(res.sums[n], ref_s[n], rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(res.weights[n], ref_w[n], rtol=1e-6)


class Fleet:
    """Publishes devices' updates; answers a repeated task with the stored update, as the
    device agent does (device_agent.agent: outbox resend on a redelivered task)."""

    def __init__(self, url: str, topics: Topics) -> None:
        self.topics = topics
        self.sent: dict[str, bytes] = {}
        self.resends = 0
        self.client = MqttClient(TransportConfig(url=url, protocol="5"), "test-fleet")
        self.client.start()

    def send(self, dev: str, msg: bytes) -> None:
        self.sent[dev] = msg
        self.client.publish(self.topics.update(dev), msg)

    def resend(self, devices: list[str]) -> None:
        for d in devices:
            if d in self.sent:  # a device still training would answer when done
                self.resends += 1
                self.client.publish(self.topics.update(d), self.sent[d])

    def stop(self) -> None:
        self.client.stop()


def start_workers(url: str, tmp: Path, n: int, heartbeat: float = 0.3) -> list[subprocess.Popen]:
    conf = tmp / "worker.toml"
    conf.write_text(
        f'[worker]\nid = "x"\ngroup = "aggs"\nheartbeat_interval = {heartbeat}\n'
        f'[transport]\nurl = "{url}"\nfleet = "shard"\n'
    )
    env = dict(os.environ)
    procs = []
    for i in range(n):
        log = open(tmp / f"agg-{i}.log", "wb")  # noqa: SIM115 (closed with the process)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgefed",
                    "aggregator",
                    "--config",
                    str(conf),
                    "--id",
                    f"agg-{i}",
                    "--log-level",
                    "INFO",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
    return procs


@pytest.fixture
def cluster(mosquitto, tmp_path):
    """(driver factory, fleet, worker processes) on one mosquitto; everything stopped after."""
    topics = Topics("shard")
    made: list[ShardedAggregation] = []
    procs = start_workers(mosquitto.url, tmp_path, 3)
    fleet = Fleet(mosquitto.url, topics)

    def driver(**cfg) -> ShardedAggregation:
        sc = ShardingConfig(**{"workers": 3, "heartbeat_timeout": 3.0, "close_timeout": 20.0,
                               "group": "aggs", **cfg})  # fmt: skip
        d = ShardedAggregation(
            TransportConfig(url=mosquitto.url, fleet="shard", protocol="5"), SCHEMA, sc,
            resend=fleet.resend,
        )  # fmt: skip
        made.append(d.start())
        d.wait_for_workers(timeout=60)
        return d

    try:
        yield driver, fleet, procs
    finally:
        for d in made:
            d.stop()
        fleet.stop()
        stop_processes(procs)


def run_round(d: ShardedAggregation, fleet: Fleet, rnd: int, n: int, timeout: float = 30.0):
    devices = [f"dev-{i}" for i in range(n)]
    d.open_round(rnd, VERSION, devices)
    msgs = {dev: make_update(rnd, dev, 1000 * rnd + i) for i, dev in enumerate(devices)}
    return devices, msgs


def test_three_workers_equal_single_process_and_duplicates_count_once(cluster, tmp_path):
    driver, fleet, _ = cluster
    d = driver()
    devices, msgs = run_round(d, fleet, 1, 30)
    for dev in devices:
        fleet.send(dev, msgs[dev])
    # unsampled and malformed updates; they also shift the broker's round robin, so the
    # re-sent copies below reach other workers than the originals (cross-worker duplicates)
    fleet.client.publish(fleet.topics.update("dev-99"), make_update(1, "dev-99", 7))  # unsampled
    fleet.client.publish(fleet.topics.update("dev-0"), b"\x00garbage")  # malformed
    for dev in devices[:9]:  # the same update again, as a device re-sending after a reconnect
        fleet.client.publish(fleet.topics.update(dev), msgs[dev])
    d.pump(time.monotonic() + 30, d.all_reported)
    assert d.all_reported()

    def copies_handled() -> bool:
        """Each re-sent copy reached a worker: ignored by the one that has it (logged) or
        counted by a second one (reported to the driver)."""
        logs = "".join((tmp_path / f"agg-{i}.log").read_text(errors="replace") for i in range(3))
        same = sum(logs.count(f"duplicate of {dev}'s update ignored") for dev in devices[:9])
        cross = sum(sum(dev in r for r in d.reported.values()) >= 2 for dev in devices[:9])
        return same + cross >= 9

    d.pump(time.monotonic() + 30, copies_handled)  # before the close, as the test intends
    assert copies_handled()
    res = d.close_round()
    assert res.count == 30 and len({k[0] for k in res.keys}) == 30
    assert sorted(k[0] for k in res.keys) == sorted(devices)
    assert sum(1 for c in res.per_worker.values() if c > 0) >= 2, res.per_worker
    assert sum(res.per_worker.values()) == 30
    assert res.rejected_partials == []
    assert res.conflicts, "the re-sent copies should have reached a second worker"
    assert res.worker_rejected_updates >= 2  # the unsampled and the malformed one
    assert_equal_aggregate(res, list(msgs.values()))
    # the coordinator busy elsewhere (not pumping) for longer than the heartbeat timeout:
    # its own deafness must not be read as dead workers
    time.sleep(d.cfg.heartbeat_timeout + 1.0)  # the stimulus is time itself, not a wait
    d.pump(time.monotonic() + 1.0)
    assert len(d.live) == 3, d.dead_instances
    # a second round on the same workers: state is per round
    devices2, msgs2 = run_round(d, fleet, 2, 12)
    for dev in devices2:
        fleet.send(dev, msgs2[dev])
    d.pump(time.monotonic() + 30, d.all_reported)
    res2 = d.close_round()
    assert res2.count == 12
    assert_equal_aggregate(res2, list(msgs2.values()))
    # a coordinator restarted without its checkpoint announces round 1 again: workers follow.
    # Devices the first round 1 never sampled, so late copies of that round's re-sent
    # duplicates (still in flight on a loaded machine) cannot take part in this one.
    devices3 = [f"dev-{40 + i}" for i in range(6)]
    d.open_round(1, VERSION, devices3)
    d.pump(time.monotonic() + 20, lambda: d.workers_at(1))  # as the service does before tasks
    assert d.workers_at(1), d.worker_round
    msgs3 = {dev: make_update(1, dev, 7000 + i) for i, dev in enumerate(devices3)}
    for dev in devices3:
        fleet.send(dev, msgs3[dev])
    d.pump(time.monotonic() + 30, d.all_reported)
    res3 = d.close_round()
    assert res3.count == 6
    assert_equal_aggregate(res3, list(msgs3.values()))


@pytest.mark.parametrize("policy", ["redeliver", "drop"])
def test_worker_killed_mid_round(cluster, policy):
    driver, fleet, procs = cluster
    d = driver(on_worker_loss=policy)
    devices, msgs = run_round(d, fleet, 1, 36)
    for dev in devices[:18]:
        fleet.send(dev, msgs[dev])
    d.pump(time.monotonic() + 30, lambda: len(d.reported_devices()) >= 18)
    victim = "agg-1"
    held = set(d.reported.get(victim, {}))
    assert held, "round robin gave the victim nothing"
    os.kill(procs[1].pid, signal.SIGKILL)  # mid-round, holding updates
    procs[1].wait()
    for dev in devices[18:24]:  # in flight while the broker notices the death
        fleet.send(dev, msgs[dev])
    d.pump(time.monotonic() + 10, lambda: victim not in d.live)
    assert victim not in d.live
    for dev in devices[24:]:
        fleet.send(dev, msgs[dev])
    d.pump(time.monotonic() + 20, d.all_reported)
    res = d.close_round(timeout=10)
    assert victim not in res.per_worker
    counted = [k[0] for k in res.keys]
    assert len(counted) == len(set(counted))  # exactly once
    if policy == "redeliver":
        assert sorted(counted) == sorted(devices)
        assert fleet.resends >= len(held)
        assert res.dropped == {}
        assert_equal_aggregate(res, list(msgs.values()))
    else:
        assert held.isdisjoint(counted)
        # sent after the death was seen: a session that expires at disconnect leaves the
        # broker no dead member to queue them for, so the survivors got every one
        assert set(devices[24:]) <= set(counted)
        assert set(counted) | set(res.dropped) == set(devices)
        assert all(f"worker {victim} lost" in str(res.dropped[dev]) for dev in held)
        assert_equal_aggregate(res, [msgs[dev] for dev in counted])


def test_hung_worker_fenced_then_rejoins_without_loss(cluster):
    """SIGSTOP: the worker stays connected but silent. It is declared dead by heartbeat
    timeout and fenced; its devices are asked to re-send (again, if a copy landed on the
    hung worker). After SIGCONT it rejoins as a new instance and counts what it still
    holds; copies that reached two workers are resolved at the merge: exactly once."""
    driver, fleet, procs = cluster
    d = driver(heartbeat_timeout=2.0)
    devices, msgs = run_round(d, fleet, 1, 24)
    for dev in devices[:12]:
        fleet.send(dev, msgs[dev])
    d.pump(time.monotonic() + 30, lambda: len(d.reported_devices()) >= 12)
    old_instance = d.live["agg-2"]
    os.kill(procs[2].pid, signal.SIGSTOP)
    try:
        for dev in devices[12:]:
            fleet.send(dev, msgs[dev])
        d.pump(time.monotonic() + 15, lambda: "agg-2" not in d.live)
        assert "agg-2" not in d.live and ("agg-2", old_instance) in d.dead_instances
        d.pump(time.monotonic() + 3)  # re-sends go out meanwhile
    finally:
        os.kill(procs[2].pid, signal.SIGCONT)
    d.pump(time.monotonic() + 30, lambda: d.all_reported() and "agg-2" in d.live)
    assert d.live.get("agg-2") not in (None, old_instance)  # rejoined as a new instance
    res = d.close_round()
    counted = [k[0] for k in res.keys]
    assert sorted(counted) == sorted(devices)  # all, once
    assert fleet.resends > 0
    assert_equal_aggregate(res, list(msgs.values()))


class ForgingWorker(AggregatorWorker):
    """An in-process worker whose partials are tampered with before they are sent."""

    forge = "flip"

    def _publish_partial(self) -> None:
        p = self.partial()
        if self.forge == "flip":
            data = bytearray(encode_partial(p))
            data[-3] ^= 0xFF  # body byte: sha256 no longer matches
            data = bytes(data)
        else:  # well-formed framing and digest, but a NaN in the sums
            name = next(iter(p.sums))
            p.sums[name] = p.sums[name].copy()
            p.sums[name][0] = np.nan
            data = encode_partial(p)
        self.client.publish(self.topics.partial(self.cfg.worker_id), data)


def test_forged_partials_rejected_round_still_ends(mosquitto, tmp_path):
    topics = Topics("shard")
    procs = start_workers(mosquitto.url, tmp_path, 1)
    fleet = Fleet(mosquitto.url, topics)
    tc = TransportConfig(url=mosquitto.url, fleet="shard", protocol="5", session_expiry=0)
    evil = [ForgingWorker(WorkerConfig(f"agg-evil{i}", "aggs", 0.3, transport=tc)) for i in (0, 1)]
    evil[1].forge = "nan"
    threads = []
    d = ShardedAggregation(
        TransportConfig(url=mosquitto.url, fleet="shard", protocol="5"), SCHEMA,
        ShardingConfig(workers=3, heartbeat_timeout=3.0, close_timeout=4.0, group="aggs",
                       on_worker_loss="drop"),
    )  # fmt: skip
    try:
        for w in evil:
            w.start()
            threads.append(threading.Thread(target=w.run, daemon=True))
            threads[-1].start()
        d.start()
        d.wait_for_workers(timeout=60)
        devices, msgs = run_round(d, fleet, 1, 24)
        for dev in devices:
            fleet.send(dev, msgs[dev])
        d.pump(time.monotonic() + 30, d.all_reported)
        res = d.close_round()
        reasons = dict(res.rejected_partials)
        assert "sha256 mismatch" in reasons.get("agg-evil0", ""), res.rejected_partials
        assert "NaN" in reasons.get("agg-evil1", ""), res.rejected_partials
        assert set(res.per_worker) == {"agg-0"}
        assert res.per_worker.get("agg-0", 0) > 0
        counted = [k[0] for k in res.keys]
        assert len(counted) == len(set(counted))
        assert all("worker agg-evil" in str(r) for r in res.dropped.values()), res.dropped
        assert set(counted) | set(res.dropped) == set(devices)
        assert_equal_aggregate(res, [msgs[dev] for dev in counted])
    finally:
        d.stop()
        for w in evil:
            w.stop()
        fleet.stop()
        stop_processes(procs)


def test_partial_round_trip_json_meta_is_strict():
    """decode_partial(encode_partial(p)) is the identity on what matters (sanity)."""
    from edgefed.sharding.partial import Partial

    s = {n: np.arange(SCHEMA.size(n), dtype=np.float32) for n in SCHEMA}
    w = {n: np.full(SCHEMA.size(n), 3.0, np.float32) for n in SCHEMA}
    p = Partial(4, "agg-0", "abc", SCHEMA.digest(), [("d1", 4, "u1")], 3.0, 0, 0, s, w)
    q = decode_partial(encode_partial(p), SCHEMA)
    assert q.keys == p.keys and q.weights["fc1.bias"].shape == (1,)
    assert json.loads(json.dumps(q.keys)) == [["d1", 4, "u1"]]
