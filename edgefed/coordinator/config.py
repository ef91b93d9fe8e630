"""The coordinator's TOML configuration, validated up front with errors that name the key.

See ``examples/coordinator.toml`` for every key with its default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefed.coordinator.rounds import RoundConfig
from edgefed.sharding.config import ShardingConfig
from edgefed.transport import TransportConfig

BUILTIN_MODELS = ("digits_mlp", "digits_cnn")

_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "coordinator": {
        "rounds": int,
        "min_devices": int,
        "fraction": (int, float),
        "min_sampled": int,
        "round_timeout": (int, float),
        "wait_timeout": (int, float),
        "checkpoint": str,
        "metrics": str,
        "seed": int,
    },
    "model": {"builtin": str, "dir": str, "head": (str, list), "momentum": (int, float)},
    "training": {"local_epochs": int, "batch_size": int, "lr": (int, float)},
    "compression": {"uplink": str, "downlink": str, "error_feedback": bool},
    "fleet": {"weak_ram_mb": int, "weak_cores": int},
    "evaluation": {"dataset": str, "test_fraction": (int, float), "seed": int},
    # Ed25519 private key (hex, `edgefed keygen`) signing every downlink message (issue 7)
    "security": {"signing_key": str},
}


@dataclass
class CoordinatorConfig:
    rounds: int = 20
    wait_timeout: float = 300.0
    checkpoint: str | None = None
    metrics: str | None = None
    round: RoundConfig = field(default_factory=RoundConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"builtin": "digits_mlp"})
    strategy: dict[str, Any] = field(default_factory=lambda: {"name": "fedavg"})
    evaluation: dict[str, Any] = field(default_factory=lambda: {"dataset": "digits"})
    transport: TransportConfig = field(default_factory=TransportConfig)
    # [sharding]: aggregator workers sum the updates (docs/scale-out.md); None: this process does
    sharding: ShardingConfig | None = None
    # [sharding.transport]: the aggregation client's own account. A secured broker maps one
    # account to one connection (use_username_as_clientid), and the service opens two.
    sharding_transport: TransportConfig | None = None
    signing_key: str | None = None  # None: downlink unsigned (demo only; warned at start)

    @classmethod
    def load(cls, path: str | Path) -> CoordinatorConfig:
        try:
            with open(path, "rb") as f:
                d = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
        cfg = cls.from_dict(d)
        base = Path(path).resolve().parent  # relative paths are relative to the config file
        for attr in ("checkpoint", "metrics", "signing_key"):
            v = getattr(cfg, attr)
            if v and not Path(v).is_absolute():
                setattr(cfg, attr, str(base / v))
        if "dir" in cfg.model and not Path(cfg.model["dir"]).is_absolute():
            cfg.model["dir"] = str(base / cfg.model["dir"])
        return cfg

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoordinatorConfig:
        unknown = set(d) - set(_SECTIONS) - {"strategy", "transport", "sharding"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        for sec, keys in _SECTIONS.items():
            table = d.get(sec, {})
            if not isinstance(table, dict):
                raise ValueError(f"[{sec}] must be a table")
            for k, v in table.items():
                if k not in keys:
                    raise ValueError(f"unknown key [{sec}] {k}")
                typ = keys[k]
                if isinstance(v, bool) and typ is not bool:
                    raise ValueError(f"[{sec}] {k} must not be a boolean")
                if not isinstance(v, typ):
                    raise ValueError(f"[{sec}] {k} has the wrong type ({type(v).__name__})")
        c = d.get("coordinator", {})
        t = d.get("training", {})
        comp = d.get("compression", {})
        fleet = d.get("fleet", {})
        rc = RoundConfig(
            min_devices=c.get("min_devices", 2),
            fraction=float(c.get("fraction", 1.0)),
            min_sampled=c.get("min_sampled", 1),
            local_epochs=t.get("local_epochs", 1),
            batch_size=t.get("batch_size", 16),
            lr=float(t.get("lr", 0.05)),
            uplink=comp.get("uplink", "int8"),
            downlink=comp.get("downlink", "int8"),
            error_feedback=comp.get("error_feedback", True),
            round_timeout=float(c.get("round_timeout", 60.0)),
            weak_ram_mb=fleet.get("weak_ram_mb", 0),
            weak_cores=fleet.get("weak_cores", 0),
            seed=c.get("seed", 0),
        )
        checks = [
            ("[coordinator] rounds", 1 <= c.get("rounds", 20) <= 1_000_000),
            ("[coordinator] min_devices", 1 <= rc.min_devices <= 10_000_000),
            ("[coordinator] fraction", 0 < rc.fraction <= 1),
            ("[coordinator] min_sampled", rc.min_sampled >= 1),
            ("[coordinator] round_timeout", 0 < rc.round_timeout <= 86400),
            ("[coordinator] wait_timeout", 0 < c.get("wait_timeout", 300) <= 86400 * 7),
            ("[training] local_epochs", 1 <= rc.local_epochs <= 1000),
            ("[training] batch_size", 1 <= rc.batch_size <= 65536),
            ("[training] lr", 0 < rc.lr < 100),
            ("[fleet] weak_ram_mb", rc.weak_ram_mb >= 0),
            ("[fleet] weak_cores", rc.weak_cores >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name} out of range")
        from edgefed.codec import CompressionSpec

        for k in ("uplink", "downlink"):
            try:
                CompressionSpec.parse(getattr(rc, k))
            except ValueError as e:
                raise ValueError(f"[compression] {k}: {e}") from None
        model = dict(d.get("model", {"builtin": "digits_mlp"}))
        if ("builtin" in model) == ("dir" in model):
            raise ValueError("[model] needs exactly one of builtin = ... or dir = ...")
        if "builtin" in model and model["builtin"] not in BUILTIN_MODELS:
            raise ValueError(f"[model] builtin must be one of {BUILTIN_MODELS}")
        strategy = dict(d.get("strategy", {"name": "fedavg"}))
        from edgefed.strategies import make_strategy

        strat = make_strategy(
            strategy.get("name", "fedavg"), **{k: v for k, v in strategy.items() if k != "name"}
        )
        sharding = sharding_transport = None
        if "sharding" in d:
            if not isinstance(d["sharding"], dict):
                raise ValueError("[sharding] must be a table")
            sd = dict(d["sharding"])
            st = sd.pop("transport", None)
            if st is not None:
                if not isinstance(st, dict):
                    raise ValueError("[sharding.transport] must be a table")
                sharding_transport = TransportConfig.from_dict(st)
            sharding = ShardingConfig.from_dict(sd)
            # Workers only sum (weight * delta); they never see the other updates, so neither a
            # robust strategy (median, trimmed mean) nor a norm bound can run on their sums.
            from edgefed.strategies import LinearStrategy

            if not isinstance(strat, LinearStrategy):
                raise ValueError(
                    f"[sharding] needs a linear strategy (fedavg, fedprox, fedadam, fedyogi), "
                    f"not {strategy.get('name')!r}"
                )
            if strat.max_update_norm is not None or strat.norm_bound is not None:
                raise ValueError(
                    "[sharding] cannot apply [strategy] max_update_norm: workers sum raw updates"
                )
        ev = dict(d.get("evaluation", {"dataset": "digits"}))
        return cls(
            rounds=c.get("rounds", 20),
            wait_timeout=float(c.get("wait_timeout", 300.0)),
            checkpoint=c.get("checkpoint"),
            metrics=c.get("metrics"),
            round=rc,
            model=model,
            strategy=strategy,
            evaluation=ev,
            transport=TransportConfig.from_dict(d.get("transport", {})),
            sharding=sharding,
            sharding_transport=sharding_transport,
            signing_key=d.get("security", {}).get("signing_key"),
        )

    def make_strategy(self):
        from edgefed.strategies import make_strategy

        s = dict(self.strategy)
        return make_strategy(s.pop("name", "fedavg"), **s)
