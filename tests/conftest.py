"""Registers the shared fixtures; the harness itself lives in tests/harness/ (one module per
job: brokers, processes, models, waits). Fixture names are stable: see harness.fixtures."""

from __future__ import annotations

import pytest
from harness.fixtures import (
    embedded_broker,
    fl_model_dir,
    fleet_factory,
    inproc_fleet,
    mosquitto,
    mqtt_watch,
    secured_mosquitto,
    secured_mosquitto_factory,
)

__all__ = [
    "embedded_broker",
    "fl_model_dir",
    "fleet_factory",
    "inproc_fleet",
    "mosquitto",
    "mqtt_watch",
    "secured_mosquitto",
    "secured_mosquitto_factory",
]

# A test using one of these starts a real broker or real processes: it belongs to the system
# tier (`pytest -m "not system"` is the fast tier). Collection fails if the marker is missing.
SYSTEM_FIXTURES = frozenset(
    {
        "mosquitto",
        "embedded_broker",
        "secured_mosquitto",
        "secured_mosquitto_factory",
        "fleet_factory",
        "inproc_fleet",
        "mqtt_watch",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("system") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"tests using a real broker or fleet must be marked @pytest.mark.system: {unmarked}"
        )
