"""Issue 15: asynchronous buffered aggregation (FedBuff) and per-device adaptive uplink.

- the engine's async verbs on real tasks and real device workers (onnxruntime training,
  real compressed updates): staleness, its weight, the ``stale`` drop, duplicates, expiry;
- ``edgefed.simulate(mode="async")`` on a simulated fleet (10x speed spread, 30 % offline):
  accuracy, one model version per ``buffer_size`` accepted updates, stale drops with their
  reason, FedAdam and DP-FedAvg per buffer, checkpoint resume;
- the adaptive uplink wired into the tasks: each device's spec from its reported rate,
  recorded in the metrics with its bytes;
- the new config keys' errors, one line each;
- async over a real mosquitto with three agent processes (``python -m device_agent.cli``).

The federated model is the user's (``make_net`` in a ``my_models.py`` the test writes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness.processes import stop_processes
from harness.wait import wait_until
from rollout_helpers import export_user_net, task_data, user_models, write_device_data

from device_agent.agent import DeviceWorker
from edgefed.config.schema import ConfigError
from edgefed.coordinator.checkpoint import load_checkpoint
from edgefed.coordinator.config import CoordinatorConfig
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.staleness import parse_staleness_weight
from edgefed.protocol import unpack
from edgefed.strategies import FedAvg


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's model exported once (``model/``), per-device data and a held-out set."""
    d = tmp_path_factory.mktemp("async-user")
    export_user_net(d).save(d / "model")
    for i in range(3):
        write_device_data(d / f"data-{i}.npz", seed=i)
    x, y = task_data(400, 99)
    np.savez(d / "eval.npz", x=x, y=y)
    return d


def _engine(user_dir: Path, **cfg: Any) -> RoundEngine:
    c = {"min_devices": 1, "lr": 0.1, "uplink": "int8", **cfg}
    return RoundEngine(FederatedModel.load(user_dir / "model"), FedAvg(), RoundConfig(**c))


def _workers(user_dir: Path, root: Path, n: int) -> dict[str, DeviceWorker]:
    out = {}
    for i in range(n):
        x, y = task_data(60, i)
        out[f"dev-{i}"] = DeviceWorker(f"dev-{i}", x, y, root / f"dev-{i}", durable=False)
    return out


def test_staleness_weights() -> None:
    poly = parse_staleness_weight("poly:0.5")
    assert poly(0) == 1.0 and poly(3) == pytest.approx(0.5)
    assert parse_staleness_weight("constant")(7) == 1.0
    hinge = parse_staleness_weight("hinge:1,2")
    assert [hinge(s) for s in (0, 2, 3, 5)] == [1.0, 1.0, 0.5, 0.25]
    for bad in ("poly", "poly:x", "hinge:1", "cubic:1", "poly:-1", ""):
        with pytest.raises(ValueError, match=r"^\[coordinator\] staleness_weight: expected"):
            parse_staleness_weight(bad)


def test_engine_async_staleness_stale_drop_duplicate_and_expiry(
    user_dir: Path, tmp_path: Path
) -> None:
    """Two devices hold tasks on version 0; one answers and closes a buffer of one (version
    1), answers again (version 2); the other's update, built on version 0, is then two
    versions behind: dropped as "stale" with max_staleness 1, a copy of it a duplicate."""
    eng = _engine(user_dir, mode="async", buffer_size=1, max_staleness=1, round_timeout=5.0)
    w = _workers(user_dir, tmp_path, 2)
    eng.open_buffer(0.0)
    tasks = eng.dispatch(sorted(w), now=0.0)
    assert sorted(tasks) == ["dev-0", "dev-1"] and eng.outstanding == 2
    heads = {d: unpack(t)[0] for d, t in tasks.items()}
    assert {h["round"] for h in heads.values()} == {1}  # one dispatch, one task round
    assert {h["model_version"] for h in heads.values()} == {"r0"}
    slow = w["dev-1"].handle_task(tasks["dev-1"])
    assert slow is not None
    assert not eng.collect_done(sorted(w))  # both busy, buffer empty
    for version in (1, 2):
        up = w["dev-0"].handle_task(tasks["dev-0"])
        assert up is not None and eng.handle_update("dev-0", up)
        assert eng.buffer_full()
        m = eng.finish_round(clock_s=float(version))
        assert (m.round, m.mode, m.participants, m.staleness_max) == (version, "async", 1, 0)
        eng.open_buffer(float(version))
        tasks = eng.dispatch(sorted(w), now=float(version))
        assert list(tasks) == ["dev-0"]  # dev-1 still holds its task
        assert unpack(tasks["dev-0"])[0]["round"] == version + 1  # grows per dispatch
        assert unpack(tasks["dev-0"])[0]["model_version"] == f"r{version}"
    assert not eng.handle_update("dev-1", slow)
    assert not eng.handle_update("dev-1", slow)  # the same update again
    up = w["dev-0"].handle_task(tasks["dev-0"])
    assert up is not None and eng.handle_update("dev-0", up)
    m = eng.finish_round()
    assert m.dropped == {"stale": 1, "duplicate": 1}, m.drop_log
    assert m.drop_log[0]["device"] == "dev-1"
    assert "2 versions behind (max_staleness 1)" in m.drop_log[0]["reason"]
    # a task out past round_timeout expires: "deadline", and its late update is "late"
    eng.open_buffer(3.0)
    tasks = eng.dispatch(sorted(w), now=3.0)
    late = w["dev-1"].handle_task(tasks["dev-1"])
    eng.expire(3.0 + 6.0)
    assert eng.outstanding == 0
    assert late is not None and not eng.handle_update("dev-1", late)
    assert eng.idle(sorted(w)) == ["dev-0", "dev-1"]
    up = w["dev-0"].handle_task(eng.dispatch(["dev-0"], now=9.0)["dev-0"])
    assert up is not None and eng.handle_update("dev-0", up)
    m = eng.finish_round()
    assert m.dropped == {"deadline": 2, "late": 1}, m.drop_log


def test_stale_update_weight_is_applied(user_dir: Path, tmp_path: Path) -> None:
    """The same update folded in at staleness 0 and at staleness 3 ("poly:0.5"): the
    second moves the model by half as much (FedAvg, server lr 1)."""
    moves = []
    for stale in (0, 3):
        eng = _engine(user_dir, mode="async", buffer_size=1, max_staleness=5)
        w = _workers(user_dir, tmp_path / str(stale), 1)
        eng.open_buffer(0.0)
        task = eng.dispatch(["dev-0"], now=0.0)["dev-0"]
        up = w["dev-0"].handle_task(task)
        before = {k: v.copy() for k, v in eng.params.items()}
        eng.round += stale  # the fleet moved on while dev-0 trained
        assert up is not None and eng.handle_update("dev-0", up)
        m = eng.finish_round()
        assert m.staleness_max == stale
        moves.append(sum(float(np.abs(eng.params[k] - before[k]).sum()) for k in before))
    assert moves[1] == pytest.approx(moves[0] / 2, rel=1e-4)


def _digits_like(user_dir: Path, n: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], Any]:
    return [task_data(60, 100 + i) for i in range(n)], task_data(400, 99)


@pytest.mark.system  # a federated simulation end to end
def test_simulate_async_on_a_slow_intermittent_fleet(user_dir: Path, tmp_path: Path) -> None:
    import torch

    data, test = _digits_like(user_dir, 10)
    speeds = list(np.geomspace(1.0, 10.0, 10))
    torch.manual_seed(0)
    net = user_models(tmp_path).make_net()
    metrics = tmp_path / "m.jsonl"
    h = __import__("edgefed").simulate(
        net, data, rounds=16, mode="async", buffer_size=3, max_staleness=2, lr=0.1,
        speeds=speeds, offline_fraction=0.3, test_data=test, metrics_path=metrics, seed=1,
    )  # fmt: skip
    assert [r["round"] for r in h] == list(range(1, 17))
    assert all(r["mode"] == "async" and r["participants"] == 3 for r in h)
    assert all(r["staleness_max"] is not None and r["staleness_max"] <= 2 for r in h)
    assert h.clock_s == sorted(h.clock_s) and h.clock_s[0] > 0
    drops = [d for r in h for d in r["drop_log"]]
    stale = [d for d in drops if d["reason"].startswith("stale: ")]
    assert stale, drops  # the 10x slower devices fall behind and are dropped as such
    assert all("versions behind (max_staleness 2)" in d["reason"] for d in stale)
    assert h.final_accuracy is not None and h.final_accuracy > 0.85, h.accuracy
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(1, 17))  # one line per model version


@pytest.mark.system  # a federated simulation end to end
def test_simulate_async_fedadam_dp_and_checkpoint_resume(user_dir: Path, tmp_path: Path) -> None:
    """FedAdam steps once per buffer; DP-FedAvg spends privacy once per buffer; a run
    stopped after 3 versions resumes from its checkpoint to 6 with later task rounds."""
    import edgefed

    fm = FederatedModel.load(user_dir / "model")
    data, test = _digits_like(user_dir, 6)
    kw: dict[str, Any] = dict(
        mode="async", buffer_size=2, max_staleness=3, speeds=[1, 2, 3, 4, 5, 6],
        test_data=test, federated_model=fm, lr=0.1,
    )  # fmt: skip
    ck = tmp_path / "ck.npz"
    h = edgefed.simulate(None, data, rounds=3, strategy="fedadam", checkpoint=ck, **kw)
    assert len(h) == 3
    first = load_checkpoint(ck)
    assert first.round == 3 and first.meta["task_seq"] >= 3
    h = edgefed.simulate(None, data, rounds=6, strategy="fedadam", checkpoint=ck, **kw)
    assert [r["round"] for r in h] == list(range(1, 7))  # the history carried over
    assert h.clock_s[3] >= h.clock_s[2]  # the clock goes on after a resume
    second = load_checkpoint(ck)
    assert second.round == 6 and second.meta["task_seq"] > first.meta["task_seq"]
    assert {k.split("/")[0] for k in second.strategy_state} == {"m", "v"}  # FedAdam moments
    assert any(np.abs(v).sum() > 0 for k, v in second.strategy_state.items() if k[0] == "m")

    from edgefed.privacy.strategy import DPFedAvg

    dp = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, sample_rate=1.0)
    edgefed.simulate(None, data, rounds=4, strategy=dp, **kw)
    assert dp.ledger.state()["rounds"] == [[1.0, 1.0, 4]]  # privacy spent once per buffer


@pytest.mark.system  # a federated simulation end to end
@pytest.mark.parametrize("fleet", ["simulated-clock", "wall-clock"])
def test_simulate_async_resumed_equals_uninterrupted(
    user_dir: Path, tmp_path: Path, fleet: str
) -> None:
    """An async simulation stopped after 3 versions and resumed from its checkpoint to 8
    ends with exactly the model (bitwise) and history of one run to 8 without stopping:
    the tasks out at the checkpoint go on (their updates were in flight: the checkpoint
    keeps them, with the simulated clock, the availability streams and the devices'
    error-feedback residuals) instead of expiring after round_timeout. Before, the resumed
    run lost them: different versions, and "deadline" drops."""
    import edgefed

    fm = FederatedModel.load(user_dir / "model")
    data, test = _digits_like(user_dir, 6)
    kw: dict[str, Any] = dict(
        mode="async", buffer_size=2, max_staleness=4, test_data=test, federated_model=fm,
        lr=0.1, compression="topk:0.3+int8", round_timeout=30.0, max_concurrent=4,
    )  # fmt: skip
    if fleet == "simulated-clock":
        kw.update(speeds=[1, 2, 3, 5, 8, 13], offline_fraction=0.3, offline_period=4.0)
    whole = edgefed.simulate(None, data, rounds=8, checkpoint=tmp_path / "whole.npz", **kw)
    ck = tmp_path / "resumed.npz"
    first = edgefed.simulate(None, data, rounds=3, checkpoint=ck, **kw)
    assert load_checkpoint(ck).meta["outstanding"]  # tasks were out when it stopped
    resumed = edgefed.simulate(None, data, rounds=8, checkpoint=ck, **kw)
    assert len(first) == 3 and len(resumed) == len(whole) == 8

    def same(r: dict[str, Any]) -> dict[str, Any]:
        keep = ("round", "participants", "dropped", "accuracy", "eval_loss", "staleness_max")
        out = {k: r[k] for k in keep}
        if fleet == "simulated-clock":
            out["clock_s"] = r["clock_s"]
        return out

    assert [same(r) for r in resumed] == [same(r) for r in whole]
    assert not [d for r in resumed for d in r["drop_log"] if d["reason"].startswith("deadline")]
    a, b = load_checkpoint(tmp_path / "whole.npz"), load_checkpoint(ck)
    assert a.params.keys() == b.params.keys()
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_resume_with_another_fleet_names_the_checkpoint(user_dir: Path, tmp_path: Path) -> None:
    """A checkpoint of a 3-device simulated fleet resumed with 2 devices: one line naming
    the file and the key, not a traceback from deep inside the collector."""
    import edgefed

    fm = FederatedModel.load(user_dir / "model")
    data, _ = _digits_like(user_dir, 3)
    kw: dict[str, Any] = dict(mode="async", buffer_size=1, federated_model=fm, lr=0.1)
    ck = tmp_path / "ck.npz"
    edgefed.simulate(None, data, rounds=1, checkpoint=ck, speeds=[1, 2, 3], **kw)
    with pytest.raises(ValueError, match=r"ck\.npz: meta 'collector'") as e:
        edgefed.simulate(None, data[:2], rounds=2, checkpoint=ck, speeds=[1, 2], **kw)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> FederatedModel:
    """The user's net on 300 features (~5k parameters): large enough that the ladder's
    rungs differ in size (on the 226-parameter net every rung encodes to the same bytes)."""
    return export_user_net(tmp_path_factory.mktemp("async-wide"), features=300)


def test_adaptive_uplink_per_device_spec_recorded(
    wide_model: FederatedModel, tmp_path: Path
) -> None:
    """One device reports 10 kB/s, one 10 MB/s: with a 0.2 s budget the slow one is sent a
    top-k rung, the fast one int8; the metrics record each device's spec and bytes."""
    eng = RoundEngine(wide_model, FedAvg(), RoundConfig(lr=0.1, upload_budget_s=0.2))
    eng.register("dev-0", {"uplink_bytes_per_s": 10_000}, [])
    eng.register("dev-1", {"uplink_bytes_per_s": 10_000_000}, [])
    w = {
        d: DeviceWorker(d, *task_data(60, i, features=300), tmp_path / d, durable=False)
        for i, d in enumerate(["dev-0", "dev-1"])
    }
    tasks = eng.start_round(sorted(w))
    specs = {d: unpack(t)[0]["uplink"] for d, t in tasks.items()}
    assert eng.adaptive is not None
    sizes = eng.adaptive.sizes
    fits = [s for s, n in sizes.items() if n + eng.adaptive.overhead <= 0.2 * 10_000]
    assert specs == {"dev-0": fits[0], "dev-1": "int8"} and fits[0] != "int8", (specs, sizes)
    got = {}
    for d, t in tasks.items():
        up = w[d].handle_task(t)
        assert up is not None and eng.handle_update(d, up)
        got[d] = len(up)
    m = eng.finish_round()
    assert m.uplink == {d: {"spec": specs[d], "bytes": got[d]} for d in got}
    assert got["dev-0"] < got["dev-1"] / 3
    assert got["dev-0"] / 10_000 <= 0.2  # the slow device's real update fits the budget
    eng.register("dev-0", {}, [])  # no rate reported: the first rung
    assert unpack(eng.start_round(["dev-0"])["dev-0"])[0]["uplink"] == "int8"


@pytest.mark.system  # a federated simulation end to end
def test_simulate_adaptive_links(wide_model: FederatedModel) -> None:
    """A simulated fleet with one 10 kB/s link: adaptive keeps its rounds near the others'
    (its upload time is bytes / rate on the simulated clock); a fixed int8 spec does not."""
    import edgefed

    data = [task_data(60, 100 + i, features=300) for i in range(4)]
    test = task_data(300, 99, features=300)
    kw: dict[str, Any] = dict(
        rounds=3, federated_model=wide_model, test_data=test, lr=0.1, step_time=0.1,
        links=[10_000, 1e7, 1e7, 1e7],
    )  # fmt: skip
    adaptive = edgefed.simulate(None, data, upload_budget_s=0.2, **kw)
    fixed = edgefed.simulate(None, data, **kw)
    for r in adaptive:
        assert r["uplink"]["dev-000"]["spec"].startswith("topk:")
        assert {r["uplink"][f"dev-00{i}"]["spec"] for i in (1, 2, 3)} == {"int8"}
        assert r["uplink"]["dev-000"]["bytes"] / 10_000 <= 0.2
    assert all(r["uplink"]["dev-000"]["spec"] == "int8" for r in fixed)
    assert adaptive.clock_s[-1] < fixed.clock_s[-1]


def _config_error(tmp_path: Path, text: str) -> str:
    p = tmp_path / "coordinator.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        CoordinatorConfig.load(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ")
    return msg.split(": ", 1)[1]


def test_config_keys_and_their_errors(tmp_path: Path) -> None:
    p = tmp_path / "coordinator.toml"
    p.write_text(
        '[coordinator]\nmode = "async"\nbuffer_size = 4\nmax_staleness = 3\n'
        'max_concurrent = 8\nstaleness_weight = "hinge:0.5,2"\n'
        '[compression]\nupload_budget_s = 2.5\nladder = ["int8", "topk:0.05+int8"]\n'
    )
    rc = CoordinatorConfig.load(p).round
    assert (rc.mode, rc.buffer_size, rc.max_staleness, rc.max_concurrent) == ("async", 4, 3, 8)
    assert (rc.staleness_weight, rc.upload_budget_s) == ("hinge:0.5,2", 2.5)
    assert rc.ladder == ["int8", "topk:0.05+int8"]
    cases = [
        ('[coordinator]\nmode = "fast"',
         '[coordinator] mode: expected one of "sync", "async", found the string "fast"'),
        ("[coordinator]\nbuffer_size = 0",
         "[coordinator] buffer_size: expected an integer from 1 to 1000000, found the integer 0"),
        ("[coordinator]\nmax_staleness = -1",
         "[coordinator] max_staleness: expected an integer at least 0, found the integer -1"),
        ('[coordinator]\nstaleness_weight = "poly:x"',
         '[coordinator] staleness_weight: expected "poly:A", "constant" or "hinge:A,B" '
         '(A, B >= 0), found "poly:x"'),
        ('[compression]\nladder = ["int8", "zip"]', "[compression] ladder: bad spec 'zip'"),
        ("[compression]\nladder = []",
         "[compression] ladder: expected a non-empty list of compression specs"),
        ("[compression]\nupload_budget_s = -1",
         "[compression] upload_budget_s: expected a number from 0 to 86400, found the "
         "integer -1"),
    ]  # fmt: skip
    for body, want in cases:
        assert _config_error(tmp_path, body + "\n").startswith(want), body


@pytest.mark.system
def test_async_over_mosquitto_with_three_agent_processes(
    mosquitto: Any, user_dir: Path, tmp_path: Path
) -> None:
    """A coordinator process in async mode and three agent processes: each accepted update
    is answered at once with a new task on the current model, a version every 2 accepted
    updates, one metrics line per version, the final model delivered."""
    from harness.processes import Fleet

    fleet = Fleet(
        tmp_path, user_dir, mosquitto.url, 3, rounds=8, min_devices=3, mode="async",
        buffer_size=2, max_staleness=4, max_concurrent=3, round_timeout=30.0,
    )  # fmt: skip
    try:
        fleet.start_agents()
        fleet.start_coordinator()
        rounds = fleet.wait_rounds(8, timeout=120)
        assert fleet.procs["coordinator"].wait(timeout=60) == 0, fleet.log("coordinator")
        for d in fleet.devices:  # stored by every agent before the agents are stopped
            wait_until(lambda d=d: "final model r8 of run" in fleet.log(d), 30, f"{d}: r8 stored")
    finally:
        fleet.stop_all()
    assert [r["round"] for r in rounds] == list(range(1, 9))
    brief = [{k: r[k] for k in ("mode", "participants", "sampled", "dropped")} for r in rounds]
    assert all(r["mode"] == "async" and r["participants"] == 2 for r in rounds), brief
    assert all(r["staleness_max"] is not None and r["staleness_max"] <= 4 for r in rounds)
    assert rounds[-1]["accuracy"] is not None and rounds[-1]["accuracy"] > 0.75
    tasks = sum(r["sampled"] for r in rounds)  # tasks dispatched while each buffer was open
    assert tasks >= 16, rounds  # 3 at the start, then one per accepted update
    trained = {d: fleet.log(d).count("training on") for d in fleet.devices}
    assert sum(trained.values()) >= 16 and all(n >= 2 for n in trained.values()), trained
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == 8 and ck.meta["task_seq"] >= 8  # tasks sent together share a round
    for d in fleet.devices:  # the final model reached every agent (signed seq above tasks)
        state = json.loads((tmp_path / "state" / d / "state.json").read_text())
        assert state["model_version"] == "r8", state


def test_async_signed_downlink_in_process_agents(
    mosquitto: Any, user_dir: Path, tmp_path: Path
) -> None:
    """Signed downlink in async mode: every task is signed with its own task round (the
    agents' anti-replay sequence grows per task though the model version may not) and the
    final model one above the last task, so the agents refuse nothing and store it."""
    from harness.inproc import InProcFleet

    from edgefed.bundle.signing import generate_keypair
    from edgefed.security.downlink import DownlinkSigner, DownlinkVerifier

    sk, vk = generate_keypair()
    fleet = InProcFleet(
        tmp_path, user_dir, mosquitto.url, ["dev-0", "dev-1"], rounds=4, mode="async",
        buffer_size=2, round_timeout=30.0,
    )  # fmt: skip
    fleet.service.collector.signer = DownlinkSigner(sk)
    for a in fleet.agents.values():
        a.verifier = DownlinkVerifier(vk)
    eng = fleet.engine
    try:
        fleet.start_agents()
        fleet.start_coordinator()
        fleet.wait_finished(120)
        assert [h["round"] for h in eng.history] == [1, 2, 3, 4]
        assert all(h["participants"] == 2 for h in eng.history), eng.history
        for a in fleet.agents.values():
            st = a.worker.state
            wait_until(lambda st=st: st.model_version == "r4", 30, "the final model")
            assert a.refused == [], a.refused
            assert st.last_round >= 4  # one task round per dispatch, growing
    finally:
        fleet.stop()


def test_engine_restart_mid_buffer_replays_the_journal_exactly(
    user_dir: Path, tmp_path: Path
) -> None:
    """A coordinator dies mid-buffer (its engine is dropped, nothing closed): a new engine
    restored from the checkpoint and its journal holds the same tasks and the same partial
    buffer; the updates for tasks issued before the "crash" are accepted with their true
    staleness, a copy of one already buffered is a duplicate, and the version it closes
    equals the one the coordinator that never died computes from the same updates."""
    from edgefed.coordinator.checkpoint import save_checkpoint
    from edgefed.coordinator.journal import Journal, journal_path

    ck = tmp_path / "ck.npz"
    cfg = dict(mode="async", buffer_size=2, max_staleness=3)
    w = _workers(user_dir, tmp_path, 3)

    def restarted() -> RoundEngine:
        e = _engine(user_dir, **cfg)
        e.restore(load_checkpoint(ck))
        e.resume(Journal(journal_path(ck)), now=100.0)
        return e

    alive = _engine(user_dir, **cfg)
    save_checkpoint(ck, alive.checkpoint())
    alive.resume(Journal(journal_path(ck)), now=0.0)
    alive.open_buffer(0.0)
    first = alive.dispatch(sorted(w), now=0.0)  # task round 1 on version 0 for all three
    ups = {d: w[d].handle_task(t) for d, t in first.items()}
    assert alive.handle_update("dev-0", ups["dev-0"])  # buffer 1 of 2
    again = alive.dispatch(sorted(w), now=1.0)  # dev-0's next task, round 2
    assert list(again) == ["dev-0"]

    eng = restarted()  # killed here: one update buffered, three tasks out
    assert eng.outstanding == 3 and eng.aggregator is not None and eng.aggregator.count == 1
    assert {d: eng.task_round(d) for d in w} == {"dev-0": 2, "dev-1": 1, "dev-2": 1}
    assert not eng.handle_update("dev-0", ups["dev-0"])  # redelivered copy: counted once
    for e in (alive, eng):
        assert e.handle_update("dev-1", ups["dev-1"]) and e.buffer_full()
    m_alive, m = alive.finish_round(), eng.finish_round()
    assert m.dropped == {"duplicate": 1} and m.participants == m_alive.participants == 2
    for k in alive.params:
        np.testing.assert_array_equal(eng.params[k], alive.params[k])
    save_checkpoint(ck, eng.checkpoint())  # version 1 closes: the loop's order
    eng.journal.start(eng.round, eng.run_id)  # type: ignore[union-attr]
    out = load_checkpoint(ck).meta["outstanding"]  # task round, version, graph, issued at
    assert {d: t[:3] for d, t in out.items()} == {"dev-0": [2, 0, "full"], "dev-2": [1, 0, "full"]}

    eng = restarted()  # killed again, right after the checkpoint: nothing buffered
    eng.open_buffer(100.0)
    assert eng.outstanding == 2 and eng.aggregator is not None and eng.aggregator.count == 0
    assert eng.handle_update("dev-2", ups["dev-2"])  # a task from before both restarts
    up0 = w["dev-0"].handle_task(again["dev-0"])
    assert up0 is not None and eng.handle_update("dev-0", up0)
    m = eng.finish_round()
    assert (m.round, m.staleness_max, m.staleness_mean, m.dropped) == (2, 1, 1.0, {})
    assert eng.handle_update("dev-2", ups["dev-2"]) is False  # once, even after a restart
    eng.expire(100.0 + eng.cfg.round_timeout + 1)  # restored tasks got a fresh timeout
    assert eng.outstanding == 0


@pytest.mark.system  # mosquitto + aggregator worker processes
def test_async_buffers_summed_by_worker_processes_equal_unsharded(
    mosquitto: Any, user_dir: Path, tmp_path: Path
) -> None:
    """Async with [sharding]: two ``edgefed aggregator`` processes sum each buffer (the
    staleness weight applied per update where it is decoded); the model versions equal an
    unsharded engine's fed the same update bytes, with the same staleness and the same
    ``stale`` drop. Buffers: v1 from two fresh tasks; v2 from a version-0 task (staleness 1,
    weight 1/sqrt(2)) and a fresh one; v3 drops a version-0 update (staleness 2 >
    max_staleness 1) and takes a staleness-1 and a fresh one."""
    from test_sharding_mqtt import start_workers

    from edgefed.coordinator.intake import DropReason
    from edgefed.sharding import ShardedAggregation, ShardingConfig
    from edgefed.transport import Topics, TransportConfig
    from edgefed.transport.client import MqttClient

    cfg = dict(mode="async", buffer_size=2, max_staleness=1)
    sharded, plain = _engine(user_dir, **cfg), _engine(user_dir, **cfg)
    w = _workers(user_dir, tmp_path, 4)
    procs = start_workers(mosquitto.url, tmp_path, 2)
    tc = TransportConfig(url=mosquitto.url, fleet="shard", protocol="5")
    sc = ShardingConfig(workers=2, heartbeat_timeout=5.0, close_timeout=20.0, group="aggs")
    agg = ShardedAggregation(tc, sharded.schema, sc).start()
    fleet = MqttClient(tc, "test-fleet")
    fleet.start()
    held: dict[str, bytes] = {}
    try:
        agg.wait_for_workers(timeout=60)
        plan = [(["dev-0", "dev-1"], 0), (["dev-2", "dev-0"], 0), (["dev-3", "dev-1", "dev-2"], 1)]
        for version, (answering, stale_drops) in enumerate(plan, 1):
            sharded.open_buffer(0.0, sharded=True)
            plain.open_buffer(0.0)
            tasks = sharded.dispatch(sorted(w), now=0.0)
            assert sorted(plain.dispatch(sorted(w), now=0.0)) == sorted(tasks)
            held.update(tasks)
            agg.announce(sharded.announcement(for_workers=True))
            agg.pump(time.monotonic() + 30, lambda v=version: agg.workers_at(v))
            assert agg.workers_at(version), agg.worker_round
            for d in answering:
                up = w[d].handle_task(held[d])
                assert up is not None
                fleet.publish(Topics("shard").update(d), up)
                plain.handle_update(d, up)

            def reported(n: int = stale_drops) -> bool:
                stale = [x for x in agg.worker_drops if x.reason is DropReason.STALE]
                return len(agg.reported_devices()) >= 2 and len(stale) >= n

            agg.pump(time.monotonic() + 30, reported)
            assert reported(), (agg.reported, agg.worker_drops)
            got, want = sharded.finish_round(agg.close_round()), plain.finish_round()
            assert (got.round, got.participants, got.dropped) == (version, 2, want.dropped)
            assert (got.staleness_mean, got.staleness_max) == (
                want.staleness_mean, want.staleness_max,
            ), (got, want)  # fmt: skip
            for k in plain.params:
                np.testing.assert_allclose(sharded.params[k], plain.params[k], rtol=1e-5, atol=1e-7)
        assert want.dropped == {"stale": 1} and want.staleness_max == 1
        assert sharded.outstanding == plain.outstanding == 1  # dev-0 holds its v2 task
    finally:
        agg.stop()
        fleet.stop()
        stop_processes(procs)
