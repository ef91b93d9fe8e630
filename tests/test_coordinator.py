"""Coordinator: config validation, atomic checkpoints, and the round engine driven with real
exported step graphs, real codec bytes and real device workers (no broker needed here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import DeviceWorker
from edgefed.coordinator.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from edgefed.coordinator.config import CoordinatorConfig
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.strategies import FedAvg, FedYogi
from edgefed.transport.message import pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 10)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


@pytest.fixture(scope="module")
def fm(fl_model_dir: Path) -> FederatedModel:
    """The demo 10-10-2 MLP (plus its head-only graph, exported once per session by the harness)."""
    return FederatedModel.load(fl_model_dir / "model-head")


def _setup(fm, tmp_path: Path, n: int = 3, uplink: str = "int8", strategy=None):
    eng = RoundEngine(fm, strategy or FedAvg(), RoundConfig(uplink=uplink, lr=0.1, seed=1))
    workers = {
        f"d{i}": DeviceWorker(f"d{i}", *_data(40, i), tmp_path / f"d{i}", durable=False)
        for i in range(n)
    }
    return eng, workers


def test_example_config_loads_and_bad_configs_are_named() -> None:
    cfg = CoordinatorConfig.load(ROOT / "examples" / "coordinator.toml")
    assert cfg.round.uplink == "topk:0.1+int8" and cfg.rounds == 50
    assert cfg.checkpoint and Path(cfg.checkpoint).is_absolute()
    bad = [  # one line: [section] key: expected ..., found ...
        ({"coordinator": {"roundz": 3}}, "\\[coordinator\\] roundz: unknown key"),
        ({"coordinator": {"rounds": "3"}}, 'rounds: expected an integer, found the string "3"'),
        ({"coordinator": {"rounds": 0}}, "rounds: expected an integer from 1 to"),
        ({"coordinator": {"fraction": 1.5}}, "fraction: expected a number above 0 and at most 1"),
        ({"compression": {"uplink": "topk:2"}}, "uplink"),
        ({"strategy": {"name": "nope"}}, 'name: expected one of .*found "nope"'),
        ({"model": {"builtin": "resnet"}}, "builtin: expected one of"),
        ({"transport": {"inflight_window": 0}}, "inflight_window"),
        ({"extra": {}}, "\\[extra\\]: unknown section"),
        ({"training": {"lr": True}}, "lr: expected a number, found the boolean true"),
    ]
    for d, msg in bad:
        with pytest.raises(ValueError, match=msg):
            CoordinatorConfig.from_dict(d)


def test_checkpoint_round_trip_and_corruption(tmp_path: Path) -> None:
    p = tmp_path / "ck" / "c.npz"
    ck = Checkpoint(4, "r4", {"w": np.ones((2, 3), np.float32)}, {"m/w": np.zeros(3)}, {"a": 1})
    save_checkpoint(p, ck)
    save_checkpoint(p, ck)  # overwrite in place
    got = load_checkpoint(p)
    assert got.round == 4 and got.meta == {"a": 1}
    np.testing.assert_array_equal(got.params["w"], ck.params["w"])
    assert [f.name for f in p.parent.iterdir()] == ["c.npz"]  # no temp files left
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(p)
    save_checkpoint(p, Checkpoint(1, "r1", {"w": np.full(2, np.nan, np.float32)}))
    with pytest.raises(CheckpointError, match="not finite"):
        load_checkpoint(p)


def test_round_accepts_each_device_once_and_names_every_drop(fm, tmp_path: Path) -> None:
    eng, workers = _setup(fm, tmp_path)
    tasks = eng.start_round(sorted(workers))
    assert set(tasks) == set(workers)
    ups = {d: workers[d].handle_task(t) for d, t in tasks.items()}
    assert eng.handle_update("d0", ups["d0"])
    assert not eng.handle_update("d0", ups["d0"])  # QoS 1 redelivery: counted once
    assert not eng.handle_update("d1", ups["d0"])  # d0's update on d1's topic
    assert not eng.handle_update("d1", b"\x00\x01garbage")  # malformed
    header, parts = unpack(ups["d1"])
    header["update_id"] = "another-id"  # a second, different update from d1
    assert eng.handle_update("d1", ups["d1"])
    assert not eng.handle_update("d1", pack(header, parts))
    header2, parts2 = unpack(ups["d2"])
    parts2["update"] = parts2["update"][:-7]  # truncated codec payload
    assert not eng.handle_update("d2", pack(header2, parts2))
    header3 = dict(header2, round=7)
    assert not eng.handle_update("d2", pack(header3, parts2))
    assert eng.handle_update("d2", ups["d2"])  # the genuine one still counts
    assert eng.all_answered()
    m = eng.finish_round()
    assert m.participants == 3 and m.sampled == 3
    reasons = [d["reason"] for d in m.drop_log]
    assert sum(r.startswith("duplicate") for r in reasons) == 2
    assert any("header device 'd0' != topic device" in r for r in reasons)
    assert any(r.startswith("invalid:") and "header" in r for r in reasons)
    assert any("future round 7" in r for r in reasons)
    assert m.bytes_up > m.payload_up > 0 and m.bytes_down > 0
    assert not eng.handle_update("d0", ups["d0"])  # after the round closed: late
    assert eng.history[-1]["round"] == 1


def test_deadline_drops_missing_devices_and_training_improves(fm, tmp_path: Path) -> None:
    eng, workers = _setup(fm, tmp_path, uplink="topk:0.5+int8")
    x_test, y_test = _data(300, 99)
    from edgefed.simulation import make_evaluator

    g = fm.graphs["full"]
    eng.evaluate = make_evaluator(g.inference_onnx, g.manifest, x_test, y_test)
    acc0 = eng.evaluate(eng.params)[0]
    for rnd in range(1, 9):
        tasks = eng.start_round(sorted(workers))
        for d, t in tasks.items():
            if d == "d2" and rnd == 1:
                continue  # d2 never answers round 1
            eng.handle_update(d, workers[d].handle_task(t))
        m = eng.finish_round()
        if rnd == 1:
            assert m.participants == 2 and m.dropped == {"deadline": 1}
    assert m.accuracy > max(acc0 + 0.15, 0.8)


def test_mixed_fleet_head_only_devices_update_only_the_head(fm, tmp_path: Path) -> None:
    eng, workers = _setup(fm, tmp_path)
    for d in workers:
        eng.register(d, {"profile": "weak"} if d != "d0" else {"ram_mb": 8000, "cores": 4}, [])
    tasks = eng.start_round(["d1", "d2"])  # weak devices only
    for d, t in tasks.items():
        assert unpack(t)[0]["graph_id"] == "head"
        eng.handle_update(d, workers[d].handle_task(t))
    before = {k: v.copy() for k, v in eng.params.items()}
    eng.finish_round()
    np.testing.assert_array_equal(eng.params["0.weight"], before["0.weight"])
    assert not np.array_equal(eng.params["2.weight"], before["2.weight"])
    tasks = eng.start_round(["d0", "d1"])  # one strong, one weak: per-coordinate mean
    assert unpack(tasks["d0"])[0]["graph_id"] == "full"
    assert "graph" not in unpack(tasks["d1"])[1]  # d1 already holds the head graph
    for d, t in tasks.items():
        eng.handle_update(d, workers[d].handle_task(t))
    eng.finish_round()
    assert not np.array_equal(eng.params["0.weight"], before["0.weight"])
    # RAM/cores rules
    eng.cfg.weak_ram_mb = 1024
    eng.register("pi", {"ram_mb": 512, "cores": 4}, [])
    assert eng.graph_for("pi") == "head" and eng.graph_for("d0") == "full"


def test_checkpoint_resume_continues_identically(fm, tmp_path: Path) -> None:
    eng, workers = _setup(fm, tmp_path, strategy=FedYogi(server_lr=0.05))
    for _ in range(2):
        for d, t in eng.start_round(sorted(workers)).items():
            eng.handle_update(d, workers[d].handle_task(t))
        eng.finish_round()
    save_checkpoint(tmp_path / "c.npz", eng.checkpoint())
    eng2 = RoundEngine(fm, FedYogi(server_lr=0.05), RoundConfig(lr=0.1, seed=1))
    eng2.restore(load_checkpoint(tmp_path / "c.npz"))
    assert eng2.round == 2 and eng2.model_version == "r2" and len(eng2.history) == 2
    for k in eng.params:
        np.testing.assert_array_equal(eng2.params[k], eng.params[k])
    assert eng2.devices["d0"].accepted == 2
    assert eng2.sample(sorted(workers)) == eng.sample(sorted(workers))  # same RNG stream
    # the same update re-sent after the restart is still recognised as counted
    tasks = eng2.start_round(sorted(workers))
    assert unpack(tasks["d0"])[0]["round"] == 3
    assert "graph" in unpack(tasks["d0"])[1]  # graphs are resent after a restart


def test_streaming_fedavg_equals_aggregate_over_kept_updates(fm, tmp_path: Path) -> None:
    from edgefed.codec import decode_update
    from edgefed.strategies import ClientUpdate, Median

    eng, workers = _setup(fm, tmp_path, strategy=FedAvg(max_update_norm=0.05))
    before = {k: v.copy() for k, v in eng.params.items()}
    ups = []
    for d, t in eng.start_round(sorted(workers)).items():
        out = workers[d].handle_task(t)
        eng.handle_update(d, out)
        h, parts = unpack(out)
        dense = decode_update(parts["update"], eng.schema).to_dense()
        ups.append(ClientUpdate(d, dense, h["num_samples"]))
    eng.finish_round()
    ref = FedAvg(max_update_norm=0.05).aggregate(1, before, ups)
    for k in ref:
        np.testing.assert_allclose(eng.params[k], ref[k], rtol=1e-5, atol=1e-7)
    assert eng.aggregator is None  # nothing held between rounds
    from edgefed.coordinator.aggregation import (
        BufferedAggregator,
        FixedNormBound,
        StreamingAggregator,
    )

    med = RoundEngine(fm, Median(), RoundConfig())
    med.start_round(sorted(workers))
    assert isinstance(med.aggregator, BufferedAggregator)  # robust: every update kept
    eng.start_round(sorted(workers))  # linear: summed on arrival from the compressed form
    assert isinstance(eng.aggregator, FixedNormBound)
    assert isinstance(eng.aggregator.inner, StreamingAggregator)


def test_checkpoint_keeps_json_strategy_state_and_refuses_objects(tmp_path: Path) -> None:
    """A DP ledger (JSON) must survive a restart: as an object array np.savez pickled it and
    the loader (allow_pickle=False) then refused the whole checkpoint."""
    from edgefed.privacy.strategy import DPFedAvg

    dp = DPFedAvg(clip_norm=1.0, noise_multiplier=1.1, expected_clients=10, sample_rate=0.1)
    for _ in range(7):
        dp.ledger.record(1.1, 0.1)
    state = {**dp.state_dict(), "m/w": np.arange(3, dtype=np.float32)}
    p = tmp_path / "c.npz"
    save_checkpoint(p, Checkpoint(3, "r3", {"w": np.ones(3, np.float32)}, state))
    got = load_checkpoint(p).strategy_state
    assert got["ledger"] == dp.state_dict()["ledger"]
    np.testing.assert_array_equal(got["m/w"], state["m/w"])
    dp2 = DPFedAvg(clip_norm=1.0, noise_multiplier=1.1, expected_clients=10, sample_rate=0.1)
    dp2.load_state_dict({"ledger": got["ledger"]})
    assert dp2.ledger.state() == dp.ledger.state()
    with pytest.raises(CheckpointError, match="'odd' is neither an array nor JSON"):
        save_checkpoint(p, Checkpoint(4, "r4", {"w": np.ones(3, np.float32)}, {"odd": {1, 2}}))
    assert load_checkpoint(p).round == 3  # the refused save left the old checkpoint intact


def test_adaptive_norm_bound_history_survives_a_restart(fm, tmp_path: Path) -> None:
    from edgefed.security.norm_bound import AdaptiveNormBound

    def strategy() -> FedAvg:
        s = FedAvg()
        s.norm_bound = AdaptiveNormBound(factor=2.0, min_history=2)
        return s

    eng, workers = _setup(fm, tmp_path, strategy=strategy())
    for _ in range(2):
        for d, t in eng.start_round(sorted(workers)).items():
            eng.handle_update(d, workers[d].handle_task(t))
        eng.finish_round()
    bound = eng.strategy.norm_bound.bound
    assert bound is not None and bound > 0
    save_checkpoint(tmp_path / "c.npz", eng.checkpoint())
    eng2 = RoundEngine(fm, strategy(), RoundConfig(uplink="int8", lr=0.1, seed=1))
    assert eng2.strategy.norm_bound.bound is None  # a fresh bound would start warm-up again
    eng2.restore(load_checkpoint(tmp_path / "c.npz"))
    assert eng2.strategy.norm_bound.bound == pytest.approx(bound)


def test_tasks_are_joined_when_read_and_counted_when_built(fm, tmp_path: Path) -> None:
    """The round holds header + shared parts per device, not a joined copy per device."""
    from edgefed.transport.message import PackedMessage

    eng, workers = _setup(fm, tmp_path, n=5)
    tasks = eng.start_round(sorted(workers))
    assert not isinstance(tasks, dict) and sorted(tasks) == sorted(workers)
    first = {d: tasks[d] for d in tasks}
    assert all(tasks[d] == first[d] for d in tasks)  # deterministic on every read
    assert all(tasks[d] is not first[d] for d in tasks)  # built on read, not kept
    seeds = {unpack(t)[0]["hyper"]["seed"] for t in first.values()}
    assert len(seeds) == 5  # per-device seeds drawn when the round opened
    for d, t in first.items():
        assert eng.handle_update(d, workers[d].handle_task(t))
    m = eng.finish_round()
    assert m.bytes_down == sum(len(t) for t in first.values())
    signed = tasks.map(lambda d, t: d.encode() + t)
    assert signed["d1"] == b"d1" + first["d1"]
    msg = PackedMessage({"type": "x"}, {"a": b"12", "b": b"345"})
    assert len(msg) == len(msg.to_bytes()) and unpack(msg.to_bytes())[1] == {
        "a": b"12",
        "b": b"345",
    }


def test_dp_fedavg_from_the_compressed_form_equals_the_dense_mechanism(fm, tmp_path: Path) -> None:
    """The coordinator's DP wrapper (clip while adding, unweighted, noise once at close) gives
    the same model as DP-FedAvg over the dense decoded updates, same seed, same noise."""
    from edgefed.codec import decode_update
    from edgefed.coordinator.aggregation import DPAggregator
    from edgefed.privacy.strategy import DPFedAvg
    from edgefed.strategies import ClientUpdate

    def dp() -> DPFedAvg:
        return DPFedAvg(clip_norm=0.05, noise_multiplier=1.0, expected_clients=3,
                        sample_rate=1.0, seed=5)  # fmt: skip

    eng, workers = _setup(fm, tmp_path, strategy=dp())
    before = {k: v.copy() for k, v in eng.params.items()}
    ups = []
    for d, t in eng.start_round(sorted(workers)).items():
        out = workers[d].handle_task(t)
        assert eng.handle_update(d, out)
        h, parts = unpack(out)
        dense = decode_update(parts["update"], eng.schema).to_dense()
        ups.append(ClientUpdate(d, dense, h["num_samples"]))
    agg = eng.aggregator
    assert isinstance(agg, DPAggregator) and agg.count == 3
    assert agg.clipped == 3  # every update is larger than the tiny clip norm
    eng.finish_round()
    ref_strategy = dp()
    ref = ref_strategy.aggregate(1, before, ups)
    for k in ref:
        assert not np.allclose(ref[k], before[k])  # the noise moved it
        np.testing.assert_allclose(eng.params[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert eng.strategy.ledger.rounds == ref_strategy.ledger.rounds == {(1.0, 1.0): 1}
