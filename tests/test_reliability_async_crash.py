"""Reliability: an asynchronous (FedBuff) coordinator process is SIGKILLed mid-buffer and
restarted.

Three agent processes and a coordinator process in ``mode = "async"`` on a real mosquitto;
one agent trains on a large local set, so its task stays out for seconds. The test kills
the coordinator as soon as the first model version is recorded (the slow device still
trains on version 0, the fast ones hold newer tasks, the next buffer is filling), restarts
it with the same config and lets it finish. Proves (coordinator/journal.py): the tasks it
issued before the kill are still its tasks (no update is dropped as ``late``), the slow
device's update is accepted with its true staleness, nothing is counted twice, every
version 1..N is produced exactly once.
"""

from __future__ import annotations

import pytest
from harness.models import slow_and_fast

from edgefed.coordinator.checkpoint import load_checkpoint

pytestmark = pytest.mark.system  # a fleet of real processes


def test_async_coordinator_sigkill_mid_buffer_keeps_its_tasks(
    mosquitto, fleet_factory, fl_model_dir, tmp_path
) -> None:
    rounds = 24
    fleet = fleet_factory(
        mosquitto.url, 3, rounds=rounds, min_devices=3, mode="async", buffer_size=2,
        max_staleness=rounds, max_concurrent=3, round_timeout=120.0,
    )  # fmt: skip
    slow = slow_and_fast(fleet, fl_model_dir, tmp_path)  # seconds per task vs 10x faster
    fleet.start_agents()
    fleet.start_coordinator()
    fleet.wait_rounds(1, timeout=120)
    fleet.kill("coordinator")
    killed_at = len(fleet.rounds())
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == killed_at and slow in ck.meta["outstanding"], ck.meta["outstanding"]
    assert ck.meta["outstanding"][slow][1] == 0  # still training on version 0

    fleet.start_coordinator()  # same config, same checkpoint and journal: nothing else
    after = fleet.wait_rounds(rounds, timeout=300)
    assert fleet.procs["coordinator"].wait(timeout=60) == 0, fleet.log("coordinator")
    log = fleet.log("coordinator")
    assert f"resumed version {killed_at}:" in log, log[-3000:]
    assert [r["round"] for r in after] == list(range(1, rounds + 1))  # none lost or repeated
    drops = [d for r in after for d in r["drop_log"]]
    assert not [d for d in drops if d["reason"].startswith("late")], drops
    assert all(r["participants"] == 2 for r in after), after
    ck = load_checkpoint(fleet.checkpoint)
    accepted = {d: s["accepted"] for d, s in ck.meta["devices"].items()}
    assert sum(accepted.values()) == 2 * rounds, accepted  # each accepted update once
    trained = {d: fleet.log(d).count("training on") for d in fleet.devices}
    for d in fleet.devices:  # every update a device trained counted once (its last may
        assert trained[d] - 1 <= accepted[d] <= trained[d], (trained, accepted)  # be out)
    assert accepted[slow] >= 1  # the task it held across the kill was accepted...
    assert max(r["staleness_max"] for r in after[killed_at:]) >= 1  # ...at its staleness
