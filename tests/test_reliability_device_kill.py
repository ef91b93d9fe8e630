"""Reliability: 30% of the sampled devices die mid-round (SIGKILL, real processes).

Ten agent processes and a coordinator process on a real mosquitto. Three agents hold a large
local data set, so they are still training when the round-1 announcement appears; the test
SIGKILLs them at that moment. The round must close at its deadline with the seven others,
the metrics JSON line must name each dead device with reason "deadline", and the next rounds
must run with the survivors (their Last Will marked them offline).
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.system  # a fleet of real processes


def _wait_presence(watch, n: int, timeout: float = 60.0) -> None:
    def online(msgs) -> bool:
        last: dict[str, str] = {}
        for t, p in msgs:
            if "/presence/" in t and p:
                last[t] = json.loads(p)["status"]
        return sum(s == "online" for s in last.values()) >= n

    watch.wait_for(online, timeout)


def test_round_completes_at_deadline_when_30pct_of_devices_are_killed(
    mosquitto, fleet_factory, mqtt_watch, fl_model_dir
) -> None:
    deadline_s = 6.0
    fleet = fleet_factory(mosquitto.url, 10, rounds=3, min_devices=7, round_timeout=deadline_s)
    victims = ["dev-0", "dev-1", "dev-2"]
    for d in victims:
        fleet.data[d] = fl_model_dir / "data-slow.npz"
    watch = mqtt_watch(mosquitto.url, ["edgefed/rel/presence/+", "edgefed/rel/round"])
    fleet.start_agents()
    _wait_presence(watch, 10)
    fleet.start_coordinator()
    watch.wait_for(lambda ms: any(t.endswith("/round") for t, _ in ms), 60)
    ann = watch.json("/round")[-1]
    assert ann["round"] == 1 and len(ann["sampled"]) == 10
    t_kill = time.monotonic()
    for d in victims:
        fleet.kill(d)

    rounds = fleet.wait_rounds(3, timeout=90)
    r1 = rounds[0]
    assert r1["round"] == 1 and r1["sampled"] == 10 and r1["participants"] == 7
    assert r1["dropped"] == {"deadline": 3}
    dead = sorted(d["device"] for d in r1["drop_log"])
    assert dead == victims
    assert all(d["reason"].startswith("deadline") for d in r1["drop_log"])
    # it waited for the deadline (the dead never answer), and not much longer
    assert deadline_s * 0.9 <= r1["wall_seconds"] <= deadline_s + 10
    assert time.monotonic() - t_kill >= deadline_s * 0.8
    # later rounds: the Last Will took the dead offline, the survivors carry on
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds[1:]:
        assert r["sampled"] == 7 and r["participants"] == 7 and r["dropped"] == {}
    assert rounds[-1]["accuracy"] > 0.5
    fleet.procs["coordinator"].wait(timeout=30)
    assert fleet.procs["coordinator"].returncode == 0
