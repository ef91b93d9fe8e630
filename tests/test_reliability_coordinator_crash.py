"""Reliability: the coordinator process is SIGKILLed mid-round and restarted.

Four agent processes and a coordinator process on a real mosquitto. One agent trains on a
large local set, so each round lasts seconds; the test kills the coordinator as soon as the
round-3 announcement appears (rounds 1-2 finished, round 3 open), checks the checkpoint on
disk says 2, restarts the coordinator with the same config and lets it finish. The agents
are never touched. Proves: resume from the last checkpoint; every round 1..N finished exactly
once (metrics lines and the checkpoint's history); devices carry on by themselves.
"""

from __future__ import annotations

import json

import pytest

from edgefed.coordinator.checkpoint import load_checkpoint

pytestmark = pytest.mark.system  # a fleet of real processes


def test_coordinator_sigkill_mid_round_resumes_without_losing_or_repeating_rounds(
    mosquitto, fleet_factory, mqtt_watch, fl_model_dir
) -> None:
    rounds = 4
    fleet = fleet_factory(mosquitto.url, 4, rounds=rounds, min_devices=4, round_timeout=30.0)
    fleet.data["dev-3"] = fl_model_dir / "data-slow.npz"
    watch = mqtt_watch(mosquitto.url, ["edgefed/rel/round"])
    fleet.start_agents()
    fleet.start_coordinator()

    def announced(k: int):
        return lambda ms: any(
            t.endswith("/round") and p and json.loads(p)["round"] == k for t, p in ms
        )

    watch.wait_for(announced(3), 120)
    fleet.kill("coordinator")  # mid-round 3: the slow device is still training
    before = fleet.rounds()
    assert [r["round"] for r in before] == [1, 2]
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == 2 and [h["round"] for h in ck.meta["history"]] == [1, 2]

    fleet.start_coordinator()  # same config, same checkpoint path: nothing else
    after = fleet.wait_rounds(rounds, timeout=150)
    fleet.procs["coordinator"].wait(timeout=30)
    assert fleet.procs["coordinator"].returncode == 0
    assert "resumed from" in fleet.log("coordinator") and "after round 2" in fleet.log(
        "coordinator"
    )
    assert [r["round"] for r in after] == [1, 2, 3, 4]  # none lost, none repeated
    ck = load_checkpoint(fleet.checkpoint)
    assert ck.round == rounds and [h["round"] for h in ck.meta["history"]] == [1, 2, 3, 4]
    assert ck.model_version == f"r{rounds}"
    # devices continued by themselves: every agent answered every round after the restart
    for r in after[2:]:
        assert r["sampled"] == 4 and r["participants"] == 4, r
    assert all(p.poll() is None for n, p in fleet.procs.items() if n.startswith("dev-"))
    # cumulative byte counters carried over the restart (restored from the checkpoint)
    assert after[2]["cum_bytes_up"] > after[1]["cum_bytes_up"]
