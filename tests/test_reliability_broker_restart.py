"""Reliability: mosquitto is restarted mid-training (same port, sessions not persisted).

A coordinator process and four agent processes train; after round 1 the test stops the
broker, waits, and starts it again. Every process must reconnect by itself (backoff with
jitter), re-subscribe and re-announce, and the run must finish all rounds with every device
taking part again. A round open while the broker was down may close at its deadline with
drops; that is the designed behaviour and the test allows it for at most that one round.
"""

from __future__ import annotations

import pytest
from harness.wait import wait_until

pytestmark = pytest.mark.system  # a fleet of real processes


def test_broker_restart_mid_training_every_process_reconnects(
    mosquitto, fleet_factory, mqtt_watch
) -> None:
    rounds = 6  # several rounds after the outage, however fast the first ones ran
    fleet = fleet_factory(mosquitto.url, 4, rounds=rounds, min_devices=4, round_timeout=8.0)
    fleet.start_agents()
    fleet.start_coordinator()
    fleet.wait_rounds(1, timeout=120)
    mosquitto.stop()
    # restart once every process has noticed the outage (what the test is about)
    lost = ("connection lost", "disconnected")
    wait_until(
        lambda: all(any(w in fleet.log(n) for w in lost) for n in ["coordinator", *fleet.devices]),
        30,
        "every process noticing the broker is gone",
    )
    mosquitto.start()
    out = fleet.wait_rounds(rounds, timeout=60)
    fleet.procs["coordinator"].wait(timeout=30)
    assert fleet.procs["coordinator"].returncode == 0
    assert [r["round"] for r in out] == list(range(1, rounds + 1))
    disturbed = [r for r in out if r["participants"] < r["sampled"] or r["sampled"] < 4]
    assert len(disturbed) <= 1, disturbed
    assert out[-1]["sampled"] == 4 and out[-1]["participants"] == 4
    assert out[-1]["accuracy"] > 0.5
    for d in fleet.devices:  # every agent is alive and saw the broker go away
        assert fleet.procs[d].poll() is None
        assert "connection lost" in fleet.log(d) or "disconnected" in fleet.log(d)
    assert "connection lost" in fleet.log("coordinator") or "disconnected" in fleet.log(
        "coordinator"
    )
