"""Registers the shared fixtures; the harness itself lives in tests/harness/ (one module per
job: brokers, processes, models, waits). Fixture names are stable: see harness.fixtures."""

from __future__ import annotations

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
