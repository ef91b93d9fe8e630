"""Issue 14, item 6 (device side): run ids, refusals reported with their reason, the final
model delivered, a device restarted mid-round that still makes the round, and two fleets
with two coordinators on one real mosquitto. The federated model is the user's (``make_net``
in a ``my_models.py`` the test writes), exported by ``build_federated_model``."""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness.wait import wait_until
from rollout_helpers import run_cli, start_agent, task_data, user_models, write_device_data

from device_agent.agent import AgentService, DeviceWorker
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.coordinator.service import CoordinatorService
from edgefed.strategies import FedAvg
from edgefed.transport import TransportConfig
from edgefed.transport.message import unpack


@pytest.fixture(scope="module")
def user_fl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's model exported once as a FederatedModel directory, plus device data."""
    import torch

    from edgefed.coordinator.model import build_federated_model

    d = tmp_path_factory.mktemp("user-fl")
    torch.manual_seed(0)
    net = user_models(d).make_net()
    x, y = task_data(8, 0)
    build_federated_model(net, (torch.from_numpy(x), torch.from_numpy(y))).save(d / "model")
    for i in range(4):
        write_device_data(d / f"data-{i}.npz", seed=i)
    x, y = task_data(150_000, 77)  # seconds of local training: still busy when killed
    np.savez(d / "data-slow.npz", x=x, y=y)
    return d


def _engine(user_fl: Path, **cfg: Any) -> RoundEngine:
    c = {"min_devices": 1, "lr": 0.1, "uplink": "int8", "round_timeout": 30.0, **cfg}
    return RoundEngine(FederatedModel.load(user_fl / "model"), FedAvg(), RoundConfig(**c))


def _worker(user_fl: Path, state: Path, i: int = 0, device: str = "dev-0") -> DeviceWorker:
    with np.load(user_fl / f"data-{i}.npz") as z:
        return DeviceWorker(device, z["x"], z["y"], state)


def _round(engine: RoundEngine, worker: DeviceWorker) -> tuple[bytes, bytes | None]:
    task = engine.start_round([worker.device_id])[worker.device_id]
    out = worker.handle_task(task)
    if out is not None:
        engine.handle_update(worker.device_id, out)
    engine.finish_round()
    return task, out


def test_device_follows_a_new_run_and_reports_refusals(user_fl: Path, tmp_path: Path) -> None:
    old = _engine(user_fl)
    w = _worker(user_fl, tmp_path / "dev-0")
    tasks = [_round(old, w)[0] for _ in range(3)]
    assert (w.state.run_id, w.state.last_round) == (old.run_id, 3)
    assert w.state.residual_path.exists()

    new = _engine(user_fl)  # a fresh coordinator start: a new run, rounds count from 1
    assert new.run_id != old.run_id
    task = new.start_round(["dev-0"])["dev-0"]
    assert unpack(task)[0]["run_id"] == new.run_id
    out = w.handle_task(task)
    assert out is not None and "error" not in unpack(out)[0], unpack(out)[0]
    assert new.handle_update("dev-0", out)  # followed, not "stale task for round 1 (done 3)"
    assert (w.state.run_id, w.state.last_round, w.state.past_runs) == (new.run_id, 1, [old.run_id])
    # its error-feedback state was reset: the update equals a brand-new device's
    fresh = _worker(user_fl, tmp_path / "fresh").handle_task(task)
    assert fresh is not None and unpack(fresh)[1]["update"] == unpack(out)[1]["update"]

    # a task of the old run (replayed) is refused, and the refusal reaches the coordinator
    refusal = w.handle_task(tasks[-1])
    assert refusal is not None
    header = unpack(refusal)[0]
    assert header["refused"] is True and f"earlier run {old.run_id}" in header["error"]
    assert not new.handle_update("dev-0", refusal)
    m = new.finish_round()
    assert any(f"earlier run {old.run_id}" in d["reason"] for d in m.drop_log), m.drop_log

    _round(new, w)  # round 2 of the new run; then round 1 again is stale, reported as such
    stale = unpack(w.handle_task(task) or b"")[0]
    assert "stale task for round 1 (done 2 of run" in stale["error"], stale

    restarted = _engine(user_fl)  # a restart from the checkpoint keeps the run
    restarted.restore(new.checkpoint())
    assert restarted.run_id == new.run_id


def test_signed_task_of_a_new_run_is_accepted_replayed_old_run_refused(
    user_fl: Path, tmp_path: Path
) -> None:
    """The signed downlink uses the round as anti-replay sequence, so round 1 of a new run
    looks older than round 3 of the old one: the agent accepts it only because it names a run
    it never followed; a re-signed round-1 task of the old run stays a replay."""
    from edgefed.bundle.signing import generate_keypair
    from edgefed.security.downlink import DownlinkSigner, DownlinkVerifier
    from edgefed.security.envelope import EnvelopeError

    sk, vk = generate_keypair()
    signer = DownlinkSigner(sk)
    old = _engine(user_fl)
    w = _worker(user_fl, tmp_path / "dev-0")
    old_tasks = [_round(old, w)[0] for _ in range(3)]
    svc = AgentService(w, TransportConfig(fleet="f"), verifier=DownlinkVerifier(vk))
    topic = svc.topics.task("dev-0")
    with pytest.raises(EnvelopeError, match="older"):
        svc._open_signed(topic, signer.sign(topic, old_tasks[0], 1))
    new = _engine(user_fl)
    task = new.start_round(["dev-0"])["dev-0"]
    assert svc._open_signed(topic, signer.sign(topic, task, 1)) == task
    assert w.handle_task(task) is not None and w.state.run_id == new.run_id
    with pytest.raises(EnvelopeError, match="older"):  # the old run again: refused
        svc._open_signed(topic, signer.sign(topic, old_tasks[0], 0))


def _fleet(user_fl: Path, root: Path, url: str, fleet: str, rounds: int) -> tuple[Any, list]:
    t = TransportConfig(url=url, fleet=fleet, backoff_min=0.2, backoff_max=2.0, keepalive=5)
    engine = _engine(user_fl, min_devices=2)
    svc = CoordinatorService(engine, t, rounds, wait_timeout=60)
    agents = [
        AgentService(_worker(user_fl, root / fleet / d, i, d), t)
        for i, d in enumerate(["dev-0", "dev-1"])
    ]
    return svc, agents


def test_two_fleets_share_one_broker_and_devices_get_the_final_model(
    mosquitto: Any, user_fl: Path, tmp_path: Path
) -> None:
    """Two coordinators (fleets north and south) whose devices have the same ids run at once
    on one mosquitto: nobody's session is taken over (each client connected exactly once),
    every round has both devices, and each device ends with its fleet's final model r2."""
    fleets = {f: _fleet(user_fl, tmp_path, mosquitto.url, f, 2) for f in ("north", "south")}
    threads = []
    try:
        for svc, agents in fleets.values():
            threads += [a.start_thread() for a in agents]
            svc.start_thread()
        for f, (svc, _) in fleets.items():
            assert svc.finished.wait(120) and svc.error is None, (f, svc.error)
            hist = svc.engine.history
            assert [h["participants"] for h in hist] == [2, 2], (f, hist)
            assert all(h["dropped"] == {} for h in hist), (f, hist)
        for f, (svc, agents) in fleets.items():
            assert svc.client.client_id == f"edgefed-coordinator-{f}"
            for a in agents:
                st = a.worker.state
                with contextlib.suppress(TimeoutError):  # the final model is on its way
                    wait_until(lambda st=st: st.model_version == "r2", 30, "final model")
                assert st.model_version == "r2", (f, a.worker.device_id, st.model_version)
                params, _, version = st.load_model()
                assert version == "r2"
                for k, v in svc.engine.params.items():  # the final weights (int8 downlink)
                    np.testing.assert_allclose(params[k], v, atol=0.02 * np.abs(v).max() + 1e-6)
                assert a.client.connects == 1, (f, a.worker.device_id, a.client.connects)
        state_dir = str(tmp_path / "north" / "dev-0")
        x = str(user_fl / "data-0.npz")
        p = run_cli("-m", "device_agent.cli", "predict", "--state-dir", state_dir, "--input", x)
        assert p.returncode == 0 and p.stdout.startswith("model r2:"), (p.stdout, p.stderr)
    finally:
        for svc, agents in fleets.values():
            svc.stop()
            for a in agents:
                a.stop()
        for th in threads:
            th.join(timeout=10)


def test_device_restarted_mid_round_gets_its_task_again(
    mosquitto: Any, user_fl: Path, tmp_path: Path
) -> None:
    """dev-0 (a large data set: seconds of training) is SIGKILLed while training round 1 and
    started again: the coordinator re-sends its task when it comes back online, so round 1
    closes with both devices long before its 300 s deadline."""
    t = {"url": mosquitto.url, "fleet": "rs", "backoff_min": 0.2, "backoff_max": 2.0,
         "keepalive": 5}  # fmt: skip
    engine = _engine(user_fl, min_devices=2, round_timeout=300.0)
    svc = CoordinatorService(engine, TransportConfig(**t), 1, wait_timeout=60)
    data = {"dev-0": user_fl / "data-slow.npz", "dev-1": user_fl / "data-1.npz"}
    procs = {d: start_agent(tmp_path, d, p, t) for d, p in data.items()}
    try:
        svc.start_thread()
        log0 = tmp_path / "dev-0.log"
        try:
            wait_until(lambda: "round 1: training" in log0.read_text(errors="replace"), 60)
        except TimeoutError:
            raise AssertionError(log0.read_text(errors="replace")[-3000:]) from None
        procs["dev-0"].send_signal(signal.SIGKILL)
        procs["dev-0"].wait(timeout=10)
        restarted = start_agent(tmp_path, "dev-0", data["dev-0"], t)
        procs["dev-0"] = restarted
        assert svc.finished.wait(150) and svc.error is None, (
            svc.error, log0.read_text(errors="replace")[-3000:],
        )  # fmt: skip
        (h,) = engine.history
        assert h["participants"] == 2 and h["dropped"] == {}, h
        assert h["wall_seconds"] < 150, h
        assert log0.read_text().count("round 1: training") == 2  # trained again after restart
        state = json.loads((tmp_path / "state" / "dev-0" / "state.json").read_text())
        assert state["last_round"] == 1 and state["run_id"] == engine.run_id
    finally:
        svc.stop()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
