"""The device agent's TOML (``edgefed-agent --config agent.toml``): ``[agent]`` and ``[transport]``.

Read through :mod:`edgefed.config.schema` like every other role's file (torch-free): the
fields below are the keys and the only place their defaults live; a mistake is one line
naming the file, the key, what was expected and what was found. Paths are relative to the
config file; ``data`` and the key files must exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefed.config.schema import ConfigFile, Section, check_fields, option
from edgefed.transport import TransportConfig
from edgefed.transport.config import TRANSPORT, topic_level

__all__ = ["AGENT", "AGENT_FILE", "AgentConfig"]


@dataclass
class AgentConfig:
    device_id: str = option(doc="[A-Za-z0-9_.-], unique in the fleet")
    data: str = option(path="file", doc=".npz with arrays x (samples) and y (labels)")
    state_dir: str = option(
        "/var/lib/edgefed-agent", path="output", doc="model version, residual, graphs, bundles"
    )
    threads: int = option(1, min=1, max=64, doc="onnxruntime intra-op threads")
    profile: str | None = option(None, doc='"weak" forces the head-only graph')
    # Public key (hex .pub, `edgefed keygen`) of the coordinator's downlink signing key: when
    # set, every task must carry its valid signature for this topic and a current round.
    coordinator_key: str | None = option(
        None, path="file", doc="refuse tasks not signed by this coordinator public key"
    )
    bundle_key: str | None = option(
        None, path="file", doc="install only bundles signed with this public key"
    )
    group: str | None = option(None, doc='roll-out group besides "all", e.g. "canary"')
    # Fleet emulation (benchmarks, not production): this host stands in for a slower device
    # without loading its CPU, by sleeping out the rest of each emulated training step.
    emulate_step_s: float = option(
        0.0, min=0, max=3600, doc="fleet emulation: training lasts at least steps x this "
        "many seconds (a device this slow per step, its CPU idle); 0: off"
    )  # fmt: skip
    transport: TransportConfig = field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        topic_level("agent", "device_id", "device id", self.device_id)
        if self.group is not None:
            topic_level("agent", "group", "group", self.group)
        check_fields(self, "agent")

    @classmethod
    def load(cls, path: str | Path) -> AgentConfig:
        src = ConfigFile.load(path)
        return cls.from_dict(src.data, src)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: ConfigFile | None = None) -> AgentConfig:
        src = source or ConfigFile(d)
        src.check_sections(["agent", "transport"])
        transport = src.section(TRANSPORT)
        return src.section(AGENT, transport=transport)


AGENT = Section(
    "agent",
    AgentConfig,
    tuple(f for f in AgentConfig.__dataclass_fields__ if f != "transport"),
    doc="this device",
)
# Every table of an agent file, in order (docs/configuration.md is generated from these).
AGENT_FILE = (AGENT, TRANSPORT)
