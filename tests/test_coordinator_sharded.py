"""The coordinator service with ``[sharding]``: 3 ``edgefed aggregator`` worker processes sum
the updates over shared subscriptions and the coordinator process merges their partials.

Proves equality: the same fleet (same seeds, same data, fresh agent state) run once unsharded
and once sharded, each on its own fleet name of one real mosquitto, ends with the same global
model within float summation-order tolerance, and every round counts each device once.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from harness.models import slow_and_fast, tiny_data

from edgefed.coordinator.checkpoint import load_checkpoint

pytestmark = pytest.mark.system  # mosquitto + aggregator worker processes


def _run(fleet, name: str, workers: int) -> list[dict[str, object]]:
    """Rename the fleet (topics of the two runs never meet) and run it to the end."""
    _configure(fleet, name, workers)
    fleet.start_coordinator()
    fleet.start_agents()
    rounds = fleet.wait_rounds(2, timeout=90)
    fleet.procs["coordinator"].wait(timeout=30)
    return rounds


def _configure(fleet, name: str, workers: int) -> None:
    """Rename the fleet, add ``[sharding]`` and start the worker processes."""
    fleet.coord_config.write_text(
        fleet.coord_config.read_text().replace('fleet = "rel"', f'fleet = "{name}"')
        + (
            f'[sharding]\nworkers = {workers}\ngroup = "aggs"\nheartbeat_timeout = 5.0\n'
            if workers
            else ""
        )
    )
    for d in fleet.devices:
        p = fleet.agent_config(d)
        p.write_text(p.read_text().replace('fleet = "rel"', f'fleet = "{name}"'))
    if workers:
        wconf = fleet.root / "worker.toml"
        wconf.write_text(
            '[worker]\nid = "x"\ngroup = "aggs"\nheartbeat_interval = 0.5\n'
            f'[transport]\nurl = "{fleet.url}"\nfleet = "{name}"\n'
        )
        for i in range(workers):
            fleet._spawn(f"agg-{i}", ["-m", "edgefed", "aggregator", "--config", str(wconf),
                                      "--id", f"agg-{i}"])  # fmt: skip


def test_sharded_coordinator_equals_unsharded(mosquitto, fleet_factory) -> None:
    plain = fleet_factory(mosquitto.url, 3, rounds=2)
    ref = _run(plain, "plain", 0)
    plain.stop_all()
    sharded = fleet_factory(mosquitto.url, 3, rounds=2)
    got = _run(sharded, "sharded", 3)
    log = sharded.log("coordinator")
    assert "aggregator agg-2 online" in log, log[-3000:]
    for r, g in zip(ref, got, strict=True):
        assert r["participants"] == g["participants"] == 3, (r, g)
        assert g["dropped"] == {}, g
    a = load_checkpoint(plain.checkpoint)
    b = load_checkpoint(sharded.checkpoint)
    assert a.round == b.round == 2
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the model moved (so equality is not two untouched initial models)
    from edgefed.coordinator.model import FederatedModel

    init = FederatedModel.load(plain.model_dir / "model").initial
    assert any(not np.allclose(init[k], b.params[k]) for k in init)
    # the workers did the counting: their partials add up to 3 updates per round, once each
    counted = {1: 0, 2: 0}
    for i in range(3):
        for rnd, n in re.findall(
            r"round (\d+) partial #\d+: (\d+) updates", sharded.log(f"agg-{i}")
        ):
            counted[int(rnd)] += int(n)
    assert counted == {1: 3, 2: 3}, counted


def test_async_coordinator_process_with_aggregator_workers(mosquitto, fleet_factory) -> None:
    """``mode = "async"`` with ``[sharding]``: a coordinator process, 2 aggregator worker
    processes and 3 agent processes; every model version is one merge of the workers'
    buffer partials (>= buffer_size updates each), each update counted once."""
    fleet = fleet_factory(
        mosquitto.url, 3, rounds=2, mode="async", buffer_size=2, max_staleness=4,
        round_timeout=30.0,
    )  # fmt: skip
    got = _run(fleet, "asyncsh", 2)
    assert fleet.procs["coordinator"].returncode == 0, fleet.log("coordinator")[-3000:]
    assert [r["round"] for r in got] == [1, 2]
    assert all(r["mode"] == "async" and r["participants"] >= 2 for r in got), got
    assert all(r["staleness_max"] is not None for r in got), got
    counted = {1: 0, 2: 0}  # the workers' partials, per buffer
    for i in range(2):
        for rnd, n in re.findall(r"round (\d+) partial #\d+: (\d+) updates", fleet.log(f"agg-{i}")):
            counted[int(rnd)] += int(n)
    assert counted == {r["round"]: r["participants"] for r in got}, (counted, got)
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == 2 and ck.model_version == "r2"
    accepted = sum(s["accepted"] for s in ck.meta["devices"].values())
    assert accepted == sum(r["participants"] for r in got)  # each counted update once


def test_sharding_config_is_validated() -> None:
    import pytest

    from edgefed.coordinator.config import CoordinatorConfig

    cfg = CoordinatorConfig.from_dict({"sharding": {"workers": 3, "on_worker_loss": "drop"}})
    assert cfg.sharding is not None and cfg.sharding.workers == 3
    assert CoordinatorConfig.from_dict({}).sharding is None
    assert cfg.sharding_transport is None
    t = {"workers": 2, "transport": {"url": "mqtt://h:1883", "username": "c-agg"}}
    st = CoordinatorConfig.from_dict({"sharding": t}).sharding_transport
    assert st is not None and st.username == "c-agg"
    bad = [
        ({"sharding": {"workers": 0}}, "workers"),
        ({"sharding": {"wrkers": 2}}, "wrkers"),
        ({"sharding": {"transport": "mqtt://h"}}, "sharding.transport"),
        ({"sharding": {"on_worker_loss": "pray"}}, "on_worker_loss"),
        ({"sharding": {}, "strategy": {"name": "median"}}, "linear strategy"),
        ({"sharding": {}, "strategy": {"name": "fedavg", "max_update_norm": 1.0}}, "norm"),
    ]
    for d, words in bad:
        with pytest.raises(ValueError, match=words):
            CoordinatorConfig.from_dict(d)


def test_async_sharded_coordinator_sigkill_mid_buffer(
    mosquitto, fleet_factory, fl_model_dir, tmp_path
) -> None:
    """Async with [sharding], the coordinator process SIGKILLed after the first version
    while a slow agent still trains on version 0 and the workers hold the next buffer's
    updates: restarted, it re-announces the same buffer with the tasks it restored (the
    workers keep their sums), the slow update is accepted at its staleness, nothing is
    dropped as late, every version is produced once, each update counted once."""
    rounds = 8
    fleet = fleet_factory(
        mosquitto.url, 3, rounds=rounds, mode="async", buffer_size=2, max_staleness=rounds,
        round_timeout=120.0,
    )  # fmt: skip
    slow = slow_and_fast(fleet, fl_model_dir, tmp_path)
    _configure(fleet, "asynckill", 2)
    fleet.start_coordinator()
    fleet.start_agents()
    fleet.wait_rounds(1, timeout=120)
    fleet.kill("coordinator")
    killed_at = len(fleet.rounds())
    assert slow in load_checkpoint(fleet.checkpoint).meta["outstanding"]
    fleet.start_coordinator()
    after = fleet.wait_rounds(rounds, timeout=240)
    assert fleet.procs["coordinator"].wait(timeout=60) == 0, fleet.log("coordinator")[-3000:]
    assert f"resumed version {killed_at}:" in fleet.log("coordinator")
    assert [r["round"] for r in after] == list(range(1, rounds + 1))
    drops = [d for r in after for d in r["drop_log"]]
    assert not [d for d in drops if d["reason"].startswith("late")], drops
    ck = load_checkpoint(fleet.checkpoint)
    accepted = {d: s["accepted"] for d, s in ck.meta["devices"].items()}
    assert sum(accepted.values()) == sum(r["participants"] for r in after), (accepted, after)
    assert accepted[slow] >= 1, accepted  # its version-0 task survived the kill
    assert max(r["staleness_max"] or 0 for r in after[killed_at:]) >= 1


def _wait_keys(eye, rnd: int, devices: set[str], timeout: float) -> None:
    """Read the workers' status messages until they reported ``devices``' updates in ``rnd``."""
    import json
    import time

    seen: set[str] = set()
    until = time.monotonic() + timeout
    while not devices <= seen:
        if time.monotonic() > until:
            raise TimeoutError(f"workers reported {sorted(seen)} in buffer {rnd}, want {devices}")
        m = eye.get(timeout=0.2)
        if m is not None and "/status/" in m.topic:
            msg = json.loads(m.payload)
            if msg.get("round") == rnd:
                seen |= {k[0] for k in msg.get("new_keys", [])}


@pytest.mark.parametrize("closed", [False, True], ids=["buffer-open", "buffer-closed"])
def test_async_sharded_restart_keeps_the_workers_buffer(
    mosquitto, fleet_factory, tmp_path, closed: bool
) -> None:
    """The coordinator process dies while 2 aggregator worker processes hold 2 of the 3
    updates buffer 1 needs (the third device is still training) -- with the buffer still
    open, or already closed by the workers (each summed and published its partial; the
    coordinator never recorded the version). Restarted, it re-announces buffer 1; the
    workers keep their sums (reopening a closed buffer) and report the keys they hold
    again, so the third update fills the buffer at once (round_timeout is 600 s: before
    the fix the buffer could only close at that deadline, or lost the closed sums). Each
    update is counted once, never twice or zero times: every device is accepted exactly
    once per version, nothing is dropped."""
    import os
    import signal

    from edgefed.protocol import ShardTopics, Topics
    from edgefed.transport import TransportConfig
    from edgefed.transport.client import MqttClient

    name = "keepbuf" + ("c" if closed else "o")
    fleet = fleet_factory(
        mosquitto.url, 3, rounds=2, mode="async", buffer_size=3, max_staleness=4,
        round_timeout=600.0,
    )  # fmt: skip
    x, y = tiny_data(400_000, 5)  # dev-2 trains for many seconds: buffer 1 cannot fill
    np.savez(tmp_path / "data-slow.npz", x=x, y=y)
    fleet.data["dev-2"] = tmp_path / "data-slow.npz"
    _configure(fleet, name, 2)
    tc = TransportConfig(url=mosquitto.url, fleet=name)
    topics = ShardTopics(Topics(name, tc.topic_prefix))
    eye = MqttClient(tc, "test-eye", subscriptions=[f"{topics.agg}/status/+",
                                                    f"{topics.agg}/partial/+"])  # fmt: skip
    eye.start(timeout=30)
    try:
        fleet.start_coordinator()
        fleet.start_agents()
        _wait_keys(eye, 1, {"dev-0", "dev-1"}, timeout=120)
        os.kill(fleet.procs["coordinator"].pid, signal.SIGSTOP)  # hears nothing from now on
        if closed:  # the close it would send once the buffer were full, then the partials
            eye.publish(topics.close, b'{"round": 1}', timeout=10)
            got: set[str] = set()
            while got != {"agg-0", "agg-1"}:
                m = eye.get(timeout=30)
                assert m is not None, f"partials of buffer 1 from {sorted(got)} only"
                if "/partial/" in m.topic:
                    got.add(m.topic.rsplit("/", 1)[1])
        fleet.kill("coordinator")
    finally:
        eye.stop()
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == 0 and ck.meta["outstanding"] == {}  # version 1 was never recorded
    fleet.start_coordinator()
    got_rounds = fleet.wait_rounds(2, timeout=180)
    assert fleet.procs["coordinator"].wait(timeout=60) == 0, fleet.log("coordinator")[-3000:]
    assert "resumed version 0:" in fleet.log("coordinator")
    for i in range(2):
        assert "buffer 1 re-announced by a restarted coordinator" in fleet.log(f"agg-{i}")
    assert [r["participants"] for r in got_rounds] == [3, 3], got_rounds
    assert [d for r in got_rounds for d in r["drop_log"]] == []
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == 2
    accepted = {d: s["accepted"] for d, s in ck.meta["devices"].items()}
    assert accepted == {"dev-0": 2, "dev-1": 2, "dev-2": 2}, accepted
    assert ck.meta["outstanding"] == {}
