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

# A test using one of these starts a real broker or real processes: it is a system test
# (`pytest -m "not system"` is the fast tier). Modules mark themselves explicitly; this
# also marks any test that uses one of these fixtures (e.g. a new test merged from another
# branch without the mark), so the fast tier never starts a broker.
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


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)
