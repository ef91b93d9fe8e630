"""``[compression] upload_budget_s = "auto"`` (issue 15): the upload budget follows the fleet's
own round time, ``(budget_ratio - 1) x`` the median of the recent rounds' wall time
(edgefed/coordinator/adaptive.py); and ``[agent] emulate_step_s``, the fleet-emulation
knob the netns benchmark uses for realistic training times. The models are defined in user
files the tests write (tests/rollout_helpers.py ``my_models.py``)."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
from netlinks import LinkFleet, NetLab, netlab_fixture  # noqa: F401  (the netlab fixture)
from rollout_helpers import export_user_net, task_data

from device_agent.agent import AgentConfig, DeviceWorker
from device_agent.trainer import StepTrainer
from edgefed.config.schema import ConfigError
from edgefed.coordinator.adaptive import choose_spec
from edgefed.coordinator.config import CoordinatorConfig
from edgefed.coordinator.model import FederatedModel
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.protocol import unpack
from edgefed.strategies import FedAvg

WIDE = 300  # features: ~5k parameters, so the ladder's rungs differ in size


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> FederatedModel:
    return export_user_net(tmp_path_factory.mktemp("auto-wide"), WIDE)


def _round(eng: RoundEngine, workers: dict[str, DeviceWorker]) -> tuple[dict[str, str], object]:
    """One real round: tasks to the workers, their updates into the engine; (specs, metrics)."""
    tasks = eng.start_round(sorted(workers))
    specs = {d: unpack(t)[0]["uplink"] for d, t in tasks.items()}
    for d, t in tasks.items():
        up = workers[d].handle_task(t)
        assert up is not None and eng.handle_update(d, up)
    return specs, eng.finish_round()


def test_auto_budget_follows_the_measured_rounds_and_survives_a_restart(
    wide_model: FederatedModel, tmp_path: Path
) -> None:
    """Round 1: nothing measured, every device on int8 and no budget recorded. From round 2
    the budget is 0.5 x the median wall time of the rounds before (as recorded in the
    metrics), each device's spec is the ladder choice for its rate under it, and a restarted
    engine resumes with the same budget (its window comes back from the checkpoint)."""
    rates = {"dev-0": 10_000, "dev-1": 10_000_000}
    cfg = RoundConfig(lr=0.1, upload_budget_s="auto", budget_ratio=1.5)
    eng = RoundEngine(wide_model, FedAvg(), cfg)
    for d, r in rates.items():
        eng.register(d, {"uplink_bytes_per_s": r}, [])
    workers = {
        d: DeviceWorker(d, *task_data(60, i, features=WIDE), tmp_path / d, durable=False)
        for i, d in enumerate(rates)
    }
    specs, m = _round(eng, workers)
    assert specs == {"dev-0": "int8", "dev-1": "int8"} and m.upload_budget_s is None  # type: ignore[attr-defined]
    assert eng.adaptive is not None
    for _ in range(3):
        walls = [h["wall_seconds"] for h in eng.history]
        specs, m = _round(eng, workers)
        budget = m.upload_budget_s  # type: ignore[attr-defined]
        assert budget == pytest.approx(0.5 * statistics.median(walls)), (budget, walls)
        want = {
            d: choose_spec(eng.adaptive.sizes, r, budget, eng.adaptive.overhead).spec
            for d, r in rates.items()
        }
        assert specs == want, (specs, budget)
        assert m.uplink["dev-0"]["spec"] == specs["dev-0"]  # type: ignore[attr-defined]
    again = RoundEngine(wide_model, FedAvg(), cfg)
    again.restore(eng.checkpoint())
    assert again.adaptive is not None and again.adaptive.budget == eng.adaptive.budget
    with pytest.raises(ValueError, match='"auto" needs \\[coordinator\\] mode = "sync"'):
        RoundEngine(wide_model, FedAvg(), RoundConfig(mode="async", upload_budget_s="auto"))


def _error(tmp_path: Path, text: str, cls: type = CoordinatorConfig) -> str:
    p = tmp_path / "some.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        cls.load(p)  # type: ignore[attr-defined]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: "), msg
    return msg.split(": ", 1)[1]


def test_auto_budget_and_emulation_config(tmp_path: Path) -> None:
    p = tmp_path / "coordinator.toml"
    p.write_text('[compression]\nupload_budget_s = "auto"\nbudget_ratio = 1.3\n')
    rc = CoordinatorConfig.load(p).round
    assert (rc.upload_budget_s, rc.budget_ratio) == ("auto", 1.3)
    p.write_text("[compression]\nupload_budget_s = 2\n")
    assert CoordinatorConfig.load(p).round.upload_budget_s == 2.0
    cases = [
        ('[compression]\nupload_budget_s = "fast"',
         '[compression] upload_budget_s: expected a number from 0 to 86400 or "auto", found '
         'the string "fast"'),
        ("[compression]\nupload_budget_s = 90000",
         "[compression] upload_budget_s: expected a number from 0 to 86400, found the integer "
         "90000"),
        ("[compression]\nupload_budget_s = [1]",
         "[compression] upload_budget_s: expected a number or a string, found the list [1]"),
        ("[compression]\nbudget_ratio = 1",
         "[compression] budget_ratio: expected a number above 1 and at most 100, found the "
         "integer 1"),
        ('[coordinator]\nmode = "async"\n[compression]\nupload_budget_s = "auto"',
         '[compression] upload_budget_s: expected a number of seconds with [coordinator] mode '
         '= "async" ("auto" follows the round time; async has no rounds), found "auto"'),
    ]  # fmt: skip
    for body, want in cases:
        assert _error(tmp_path, body + "\n") == want, body
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 3), np.float32), y=np.zeros(2, np.int64))
    agent = f'[agent]\ndevice_id = "dev-0"\ndata = "{data}"\n'
    p.write_text(agent + "emulate_step_s = 0.25\n")
    assert AgentConfig.load(p).emulate_step_s == 0.25
    got = _error(tmp_path, agent + "emulate_step_s = -1\n", AgentConfig)
    assert got == "[agent] emulate_step_s: expected a number from 0 to 3600, found the integer -1"


def test_emulated_step_time_changes_time_only(wide_model: FederatedModel, tmp_path: Path) -> None:
    """``step_s``: the call lasts at least steps x step_s (it sleeps out what the real steps
    did not take) and the trained parameters are exactly those without it."""
    wide_model.save(tmp_path / "m")
    x, y = task_data(96, 3, features=WIDE)
    out = {}
    for step_s in (0.0, 0.05):
        tr = StepTrainer(tmp_path / "m" / "full.step.onnx", tmp_path / "m" / "full.manifest.json")
        tr.set_params(wide_model.initial)
        st = tr.train_epochs(x, y, epochs=2, batch_size=16, seed=1, step_s=step_s)
        assert st.steps == 12
        if step_s == 0:
            assert st.emulated_s == 0.0
        else:  # a lower bound: sleep never returns early
            assert st.emulated_s > 0 and st.seconds >= st.steps * step_s
        out[step_s] = tr.params
    for name, v in out[0.0].items():
        np.testing.assert_array_equal(v, out[0.05][name])


LINK_FEATURES = 1800  # the user's net at ~29k parameters: a ~29 kB int8 update, ~3 s at 10 kB/s


@pytest.fixture(scope="module")
def link_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("auto-links")
    export_user_net(d, LINK_FEATURES).save(d / "model")
    x, y = task_data(300, 99, features=LINK_FEATURES)
    np.savez(d / "eval.npz", x=x, y=y)
    for i in range(3):
        x, y = task_data(40, i, features=LINK_FEATURES)
        np.savez(d / f"data-{i}.npz", x=x, y=y)
    return d


def test_auto_budget_over_real_links(netlab: NetLab, link_model: Path) -> None:
    """Real coordinator and agent processes, dev-0 behind 10 kB/s (tc tbf), every device
    training with ``emulate_step_s``: the coordinator process reads ``"auto"``, records no
    budget in round 1 and from then on 0.5 x the median of the earlier rounds' wall time
    (from its own metrics file); dev-0 leaves int8 for a top-k rung whose real update fits
    the budget on its link, while the fast devices keep int8."""
    limit = 10_000
    fleet = LinkFleet(
        netlab, link_model, 3, compression='upload_budget_s = "auto"\nbudget_ratio = 1.5',
        rounds=5, agent_lines={d: "emulate_step_s = 0.1" for d in ("dev-0", "dev-1", "dev-2")},
    )  # fmt: skip
    netlab.links["dev-0"].throttle(limit)
    fleet.start()
    rounds = fleet.wait_rounds(5, 300)
    walls = [float(r["wall_seconds"]) for r in rounds]  # type: ignore[arg-type]
    assert rounds[0]["upload_budget_s"] is None
    for k, r in enumerate(rounds[1:], start=1):
        assert r["participants"] == 3 and not r["dropped"], r
        want = 0.5 * statistics.median(walls[:k])
        assert r["upload_budget_s"] == pytest.approx(want), (k, r["upload_budget_s"], walls)
    up = [r["uplink"] for r in rounds]
    assert up[0]["dev-0"]["spec"] == "int8"  # type: ignore[index]
    last, budget = up[-1], rounds[-1]["upload_budget_s"]
    assert last["dev-0"]["spec"].startswith("topk:"), (up, budget)  # type: ignore[index]
    assert {last[d]["spec"] for d in ("dev-1", "dev-2")} == {"int8"}, up  # type: ignore[index]
    assert last["dev-0"]["bytes"] / limit <= budget, (up, budget)  # type: ignore[index, operator]
