"""Transport settings (broker URL, TLS, credentials, limits) and broker URL parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_broker_url(url: str) -> BrokerURL:
    """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...`` (TLS). Raises ValueError."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as e:
        raise ValueError(f"broker URL {url!r}: bad port") from e
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"broker URL {url!r}: unexpected path or query")
    return BrokerURL(
        host=parts.hostname,
        port=port,
        tls=scheme in ("mqtts", "ssl"),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True)
class TransportConfig:
    """Everything a client needs to reach the broker and behave well on it.

    Defaults follow the shared measurements: a window of 100 unacknowledged QoS 1 publishes
    stays far below mosquitto's default queue of 1000 (which silently drops beyond it), and
    256 KiB chunks keep single messages small for amqtt and constrained brokers.
    """

    url: str = "mqtt://127.0.0.1:1883"
    fleet: str = "default"
    topic_prefix: str = "edgefed"
    protocol: str = "auto"  # "auto" (try MQTT 5, fall back to 3.1.1), "5" or "3.1.1"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False  # skip hostname check (test CAs only)
    keepalive: int = 30
    session_expiry: int = 3600  # seconds the broker keeps a disconnected device's session
    chunk_size: int = 256 * 1024
    max_message_bytes: int = 256 * 1024 * 1024
    reassembly_memory: int = 512 * 1024 * 1024
    reassembly_timeout: float = 120.0
    inflight_window: int = 100
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = parse_broker_url(self.url)
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"transport.protocol must be auto, 5 or 3.1.1, not {self.protocol!r}")
        checks = [
            ("keepalive", 5 <= self.keepalive <= 3600),
            ("session_expiry", 0 <= self.session_expiry <= 2**32 - 1),
            ("chunk_size", 1024 <= self.chunk_size <= 64 * 1024 * 1024),
            ("max_message_bytes", self.chunk_size <= self.max_message_bytes <= 2**34),
            ("reassembly_memory", self.reassembly_memory >= self.chunk_size),
            ("reassembly_timeout", self.reassembly_timeout > 0),
            ("inflight_window", 1 <= self.inflight_window <= 65535),
            ("backoff_min", 0 < self.backoff_min <= self.backoff_max),
            ("backoff_max", self.backoff_max <= 3600),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"transport.{name} out of range: {getattr(self, name)!r}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("transport.cert_file and transport.key_file go together")
        del b

    @property
    def broker(self) -> BrokerURL:
        return parse_broker_url(self.url)

    @property
    def use_tls(self) -> bool:
        return self.tls or self.broker.tls

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransportConfig:
        """Build from a TOML table, rejecting unknown keys (a typo must not pass silently)."""
        known = set(cls.__dataclass_fields__) - {"extra"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown [transport] keys: {sorted(unknown)}")
        return cls(**d)
