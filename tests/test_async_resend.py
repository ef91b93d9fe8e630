"""A restarted asynchronous coordinator sends again the tasks its journal says were
dispatched on the current version and are still out (coordinator/rounds.py
``RoundEngine._rebuild_journaled``): the journal line is written before the task is published,
so a kill in between left tasks no device received, and the fleet waited ``round_timeout``.

Engine level, on real files (checkpoint, fsynced journal) and real device workers training
the harness's user model (tests/harness/models.py): the rebuilt tasks are the originals
byte for byte (so their signatures are too), a device that already trained one answers
the copy with its stored update and it is counted once, answered tasks are not sent
again, nothing is sent twice, and a journal from before the plan was journaled still
gives each task back with its identity (round, version, graph).
The process-level proof (SIGKILL-like exit between journal and publish, real mosquitto and
agent processes) is tests/test_reliability_resend.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from device_agent.agent import DeviceWorker
from edgefed.bundle.signing import generate_keypair
from edgefed.coordinator.checkpoint import load_checkpoint, save_checkpoint
from edgefed.coordinator.journal import Journal, journal_path
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.tasks import graph_parts
from edgefed.protocol import unpack
from edgefed.security.downlink import DownlinkSigner
from edgefed.strategies import FedAvg

DEVICES = ["dev-0", "dev-1", "dev-2"]


def _engine(model_dir: Path) -> RoundEngine:
    cfg = RoundConfig(
        min_devices=1, lr=0.1, uplink="int8", mode="async", buffer_size=2, max_staleness=3,
        round_timeout=300.0,
    )  # fmt: skip
    return RoundEngine(FederatedModel.load(model_dir / "model"), FedAvg(), cfg)


def _workers(model_dir: Path, root: Path) -> dict[str, DeviceWorker]:
    out = {}
    for i, d in enumerate(DEVICES):
        with np.load(model_dir / f"data-{i}.npz") as z:
            out[d] = DeviceWorker(d, z["x"], z["y"], root / d, durable=False)
    return out


def _restarted(model_dir: Path, ck: Path) -> RoundEngine:
    e = _engine(model_dir)
    e.restore(load_checkpoint(ck))
    e.resume(Journal(journal_path(ck)), now=100.0)
    return e


def _alive(model_dir: Path, ck: Path) -> RoundEngine:
    """A fresh run with its version-0 checkpoint and journal (the loop's order), devices
    registered; dev-1 says it holds the graph already (its task goes without it)."""
    e = _engine(model_dir)
    for d in DEVICES:
        held = [e.model.graphs["full"].sha] if d == "dev-1" else []
        e.register(d, {"arch": "x86_64"}, held)
    save_checkpoint(ck, e.checkpoint())
    e.resume(Journal(journal_path(ck)), now=0.0)
    e.open_buffer(0.0)
    return e


def test_restart_sends_journaled_tasks_again_byte_for_byte(fl_model_dir, tmp_path) -> None:
    ck = tmp_path / "ck.npz"
    alive = _alive(fl_model_dir, ck)
    first = dict(alive.dispatch(DEVICES, now=0.0))  # journaled; "killed" before publishing
    assert "graph" not in unpack(first["dev-1"])[1] and "graph" in unpack(first["dev-0"])[1]

    eng = _restarted(fl_model_dir, ck)
    assert eng.outstanding == 3
    again = dict(eng.take_resend())  # what the loop sends as soon as the buffer is open
    assert sorted(again) == DEVICES
    for d in DEVICES:
        assert again[d] == first[d], d  # the same seed, uplink, graph decision, weights
    signer, topic = DownlinkSigner(generate_keypair()[0]), "edgefed/rel/task/dev-0"
    assert signer.sign(topic, again["dev-0"], 1) == signer.sign(topic, first["dev-0"], 1)
    assert dict(eng.take_resend()) == {}  # sent again once, not every time
    assert dict(eng.dispatch(DEVICES, now=101.0)) == {}  # every device busy

    # a device that DID get the original trains once; the copy is answered from its outbox
    w = _workers(fl_model_dir, tmp_path)
    up = w["dev-0"].handle_task(first["dev-0"])
    copy = w["dev-0"].handle_task(again["dev-0"])
    assert up is not None and copy == up and len(w["dev-0"].train_log) == 1
    assert eng.handle_update("dev-0", up) is True
    assert eng.handle_update("dev-0", copy) is False  # a duplicate, counted once
    # a device that never got it trains the copy: the buffer fills, no deadline needed
    g = eng.model.graphs["full"]  # dev-1 holds the graph, as its presence said
    parts = graph_parts(g)
    w["dev-1"].state.save_graph(g.sha, parts["graph"], parts["manifest"], parts["inference"])
    assert eng.handle_update("dev-1", w["dev-1"].handle_task(again["dev-1"])) is True
    assert eng.buffer_full()
    m = eng.finish_round()
    assert (m.participants, m.dropped) == (2, {"duplicate": 1}), m.drop_log


def test_answered_tasks_are_not_sent_again(fl_model_dir, tmp_path) -> None:
    """The journal holds dev-0's answer: only the tasks still out go again, and a device
    that answered, then got its next task, is never sent the old one."""
    ck = tmp_path / "ck.npz"
    alive = _alive(fl_model_dir, ck)
    w = _workers(fl_model_dir, tmp_path)
    first = dict(alive.dispatch(DEVICES, now=0.0))
    assert alive.handle_update("dev-0", w["dev-0"].handle_task(first["dev-0"]))
    second = dict(alive.dispatch(DEVICES, now=1.0))  # dev-0's next task (round 2)
    assert list(second) == ["dev-0"]

    eng = _restarted(fl_model_dir, ck)
    assert eng.aggregator is not None and eng.aggregator.count == 1
    again = dict(eng.take_resend())
    assert again == {"dev-0": second["dev-0"], "dev-1": first["dev-1"], "dev-2": first["dev-2"]}
    assert unpack(again["dev-0"])[0]["round"] == 2


def test_journal_without_plan_still_resends_the_same_task(fl_model_dir, tmp_path) -> None:
    """A journal written before dispatch lines carried ``plan`` (the format is unchanged):
    the task comes back with its round, version, graph and run; a fresh seed; the graph
    included (what the device holds is not known any more)."""
    ck = tmp_path / "ck.npz"
    alive = _alive(fl_model_dir, ck)
    first = dict(alive.dispatch(DEVICES, now=0.0))
    jp = journal_path(ck)
    lines = jp.read_bytes().splitlines()
    ev = json.loads(lines[1])
    assert set(ev["dispatch"]["plan"]) == set(DEVICES)
    del ev["dispatch"]["plan"]
    jp.write_bytes(b"\n".join([lines[0], json.dumps(ev).encode()]) + b"\n")

    eng = _restarted(fl_model_dir, ck)
    again = dict(eng.take_resend())
    assert sorted(again) == DEVICES
    for d in DEVICES:
        (h0, p0), (h1, p1) = unpack(first[d]), unpack(again[d])
        same = ("round", "model_version", "graph_id", "graph_sha", "run_id", "uplink")
        assert {k: h1[k] for k in same} == {k: h0[k] for k in same}, d
        assert "graph" in p1 and p1["weights"] == p0["weights"], d
    w = _workers(fl_model_dir, tmp_path)
    assert eng.handle_update("dev-2", w["dev-2"].handle_task(again["dev-2"])) is True
