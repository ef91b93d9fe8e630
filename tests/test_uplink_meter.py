"""The uplink meter (issue 15): rate from acknowledged publishes, smoothed; periods cut by a
disconnect are not measurements; resends after a reconnect are counted. Pure clock-driven
checks here; the meter against a real tc-limited link is in test_constrained_links.py."""

from __future__ import annotations

import pytest

from edgefed.transport.uplink import UplinkMeter


def test_busy_period_rate_and_ewma() -> None:
    m = UplinkMeter(alpha=0.5, min_bytes=1000)
    for mid in range(4):  # 4 x 1000 bytes in flight at t=0, acked over 2 s
        m.sent(mid, 1000, now=0.0)
    for mid, t in enumerate((0.5, 1.0, 1.5, 2.0)):
        m.acked(mid, now=t)
    assert m.rate == pytest.approx(2000.0) and m.samples == 1
    m.sent(10, 4000, now=10.0)
    m.acked(10, now=11.0)  # 4000 B/s
    assert m.rate == pytest.approx(0.5 * 4000 + 0.5 * 2000) and m.last_sample == 4000


def test_small_periods_and_unknown_acks_are_ignored() -> None:
    m = UplinkMeter(min_bytes=1000)
    m.sent(1, 200, now=0.0)
    m.acked(1, now=0.01)  # below min_bytes: RTT, not the link
    assert m.rate is None and m.samples == 0
    m.acked(99, now=0.02)  # never sent: remembered as an early ack, no sample
    m.sent(99, 5000, now=0.03)  # the ack raced ahead of the registration
    assert m.outstanding() == 0


def test_disconnect_discards_the_period_and_counts_resends() -> None:
    m = UplinkMeter(min_bytes=1000)
    m.sent(1, 3000, now=0.0)
    m.sent(2, 3000, now=0.0)
    m.acked(1, now=1.0)
    m.interrupted()  # link dropped with publish 2 unacknowledged
    assert m.resumed(now=50.0) == (1, 3000)  # reconnected 49 s later: 2 is resent
    m.acked(2, now=51.0)
    assert m.rate == pytest.approx(3000.0)  # the outage is not in the sample
    assert m.outstanding() == 0
