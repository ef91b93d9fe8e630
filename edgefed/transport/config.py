"""Transport settings (broker URL, TLS, credentials, limits) and broker URL parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from edgefed.config.schema import ConfigFile, FieldError, Section, check_fields, option

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
    """Everything a client needs to reach the broker and behave well on it (``[transport]``).

    Defaults follow the shared measurements: a window of 100 unacknowledged QoS 1 publishes
    stays far below mosquitto's default queue of 1000 (which silently drops beyond it), and
    256 KiB chunks keep single messages small for amqtt and constrained brokers. The fields
    are the keys; ranges sit with them (``edgefed.config.schema``), checked for objects built
    in Python as for ones read from a file.
    """

    url: str = option("mqtt://127.0.0.1:1883", doc="broker, mqtt://host[:port] or mqtts://")
    fleet: str = option("default", doc="fleet name: a topic level; several fleets share a broker")
    topic_prefix: str = option("edgefed", doc="first topic level")
    protocol: str = option(
        "auto", choices=("auto", "5", "3.1.1"), doc="MQTT version; auto tries 5, then 3.1.1"
    )
    username: str | None = option(None, doc="broker account")
    password: str | None = option(None, doc="broker password")
    tls: bool = option(False, doc="TLS even with an mqtt:// URL (mqtts:// implies it)")
    ca_file: str | None = option(None, path="file", doc="CA certificate (PEM) of the broker")
    cert_file: str | None = option(None, path="file", doc="client certificate (with key_file)")
    key_file: str | None = option(None, path="file", doc="client key (with cert_file)")
    tls_insecure: bool = option(False, doc="skip the hostname check (test CAs only)")
    keepalive: int = option(30, min=5, max=3600, doc="seconds between MQTT pings")
    session_expiry: int = option(
        3600, min=0, max=2**32 - 1, doc="seconds the broker keeps a disconnected session"
    )
    chunk_size: int = option(256 * 1024, min=1024, max=64 * 1024 * 1024, doc="bytes per chunk")
    max_message_bytes: int = option(
        256 * 1024 * 1024, max=2**34, doc="largest reassembled message (>= chunk_size)"
    )
    reassembly_memory: int = option(
        512 * 1024 * 1024, doc="bytes of partly received messages kept (>= chunk_size)"
    )
    reassembly_timeout: float = option(120.0, above=0, doc="seconds a partial message is kept")
    inflight_window: int = option(
        100, min=1, max=65535, doc="unacknowledged QoS 1 publishes in flight"
    )
    backoff_min: float = option(0.5, above=0, doc="first reconnect delay, seconds")
    backoff_max: float = option(30.0, max=3600, doc="longest reconnect delay, seconds")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            parse_broker_url(self.url)
        except ValueError as e:
            raise FieldError("transport", "url", str(e)) from None
        check_fields(self, "transport")
        checks = [  # (key, ok, bound, the key it is bounded by)
            (
                "max_message_bytes",
                self.max_message_bytes >= self.chunk_size,
                "at least",
                "chunk_size",
            ),
            (
                "reassembly_memory",
                self.reassembly_memory >= self.chunk_size,
                "at least",
                "chunk_size",
            ),
            ("backoff_min", self.backoff_min <= self.backoff_max, "at most", "backoff_max"),
        ]
        for name, ok, bound, other in checks:
            if not ok:
                found, limit = getattr(self, name), getattr(self, other)
                raise FieldError(
                    "transport", name, f"expected {bound} {other} ({limit}), found {found}"
                )
        if (self.cert_file is None) != (self.key_file is None):
            raise FieldError("transport", "cert_file", "goes together with key_file (set both)")

    @property
    def broker(self) -> BrokerURL:
        return parse_broker_url(self.url)

    @property
    def use_tls(self) -> bool:
        return self.tls or self.broker.tls

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: ConfigFile | None = None) -> TransportConfig:
        """Build from a ``[transport]`` table, rejecting unknown keys (a typo must not pass
        silently). ``source``: the file it came from (errors name it, paths resolve)."""
        return (source or ConfigFile({})).section(TRANSPORT, d)


def topic_level(section: str, key: str, kind: str, value: str) -> None:
    """A name used as a topic level (device id, fleet, worker group): FieldError naming key."""
    from edgefed.transport.topics import check_name

    try:
        check_name(kind, value)
    except ValueError as e:
        raise FieldError(section, key, str(e)) from None


# The [transport] table every role reads (keys: the fields above, minus ``extra``).
TRANSPORT = Section(
    "transport",
    TransportConfig,
    tuple(f for f in TransportConfig.__dataclass_fields__ if f != "extra"),
    doc="how to reach the broker (every role)",
)
