"""The coordinator's TOML configuration, validated up front with errors that name the key.

Read through :mod:`edgefed.config.schema` (one reader for every role). The keys of each
table are the fields of the dataclass it fills, and those fields hold the only defaults:
``[coordinator]``/``[training]``/``[compression]``/``[fleet]`` fill
:class:`~edgefed.coordinator.rounds.RoundConfig` (and the run-level fields here),
``[model]`` :class:`ModelConfig`, ``[evaluation]`` :class:`EvaluationConfig`, ``[strategy]``
the parameters of the strategy class it names (its signature is the source of defaults),
``[strategy.norm_bound]`` those of :class:`~edgefed.security.norm_bound.AdaptiveNormBound`.
Checks across tables run after the whole file is read (:func:`_cross_checks`).
``docs/configuration.md`` lists every key; ``examples/coordinator.toml`` shows them in use.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefed.config.schema import ConfigFile, Rule, Section, describe_value, option
from edgefed.coordinator.rounds import RoundConfig
from edgefed.sharding.config import SHARDING, ShardingConfig
from edgefed.transport import TransportConfig
from edgefed.transport.config import TRANSPORT

BUILTIN_MODELS = ("digits_mlp", "digits_cnn")
LOSSES = ("cross_entropy", "mse", "bce_with_logits")
INPUT_DTYPES = ("float32", "int64")


class _Keyed:
    """``cfg.model["builtin"]``, ``cfg.model.get("head")``, ``"dir" in cfg.model``: the dict
    access older callers use, over typed fields (a field set to None counts as absent)."""

    def get(self, key: str, default: Any = None) -> Any:
        v = getattr(self, key, None) if key in self.__dataclass_fields__ else None  # type: ignore[attr-defined]
        return default if v is None else v

    def __getitem__(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None


@dataclass
class ModelConfig(_Keyed):
    """``[model]``: which network is federated. Exactly one of ``builtin``, ``dir``,
    ``factory`` (none: the built-in ``digits_mlp``)."""

    builtin: str | None = option(None, choices=BUILTIN_MODELS, doc="a demo model by name")
    dir: str | None = option(None, path="dir", doc="a model saved by FederatedModel.save")
    factory: str | None = option(
        None,
        doc='"file.py:function" beside this config, or "package.module:function"; the '
        "function returns an nn.Module (resolved to an absolute file or a module name)",
    )
    input_shape: list[int] | None = option(  # noqa: RUF009 (option() is a dataclass field)
        None, min=1, doc="per-sample input shape, no batch axis, e.g. [1, 28, 28] (factory)"
    )
    input_dtype: str = option("float32", choices=INPUT_DTYPES, doc='"int64" for token ids')
    loss: str = option("cross_entropy", choices=LOSSES, doc="training loss of the step graph")
    num_classes: int | None = option(None, min=1, doc="classes of the output (optional)")
    head: str | list[str] | None = option(  # noqa: RUF009 (option() is a dataclass field)
        None, doc='"last" or parameter names: also export a head-only graph for weak devices'
    )
    momentum: float = option(0.0, min=0, max=0.999, doc="device-side SGD momentum")

    def __post_init__(self) -> None:
        if self.builtin is None and self.dir is None and self.factory is None:
            self.builtin = BUILTIN_MODELS[0]

    @property
    def factory_file(self) -> str | None:
        """The absolute .py file of a resolved ``factory`` (None: an importable module)."""
        if self.factory is None:
            return None
        mod = self.factory.rsplit(":", 1)[0]
        return mod if mod.endswith(".py") else None

    @property
    def factory_function(self) -> str | None:
        return None if self.factory is None else self.factory.rsplit(":", 1)[1]


@dataclass
class EvaluationConfig(_Keyed):
    """``[evaluation]``: the held-out set the coordinator scores every round on."""

    dataset: str = option(
        "digits", doc='"digits" (held-out split of sklearn digits) or an .npz with x and y'
    )
    seed: int = option(0, min=0, doc="seed of the digits split")


@dataclass
class StrategyConfig(_Keyed):
    """``[strategy]``: the strategy class by ``name`` and its constructor arguments; an
    adaptive norm bound from ``[strategy.norm_bound]``. :meth:`build` is the one place a
    strategy is made from the config."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    norm_bound: dict[str, Any] | None = None  # AdaptiveNormBound arguments

    def get(self, key: str, default: Any = None) -> Any:
        if key == "name":
            return self.name
        if key == "norm_bound":
            return default if self.norm_bound is None else self.norm_bound
        return self.params.get(key, default)

    def build(self) -> Any:
        """A fresh strategy (stateful ones must not be shared between engines)."""
        from edgefed.strategies import make_strategy

        s = make_strategy(self.name, **self.params)
        if self.norm_bound is not None:
            from edgefed.security.norm_bound import AdaptiveNormBound

            s.norm_bound = AdaptiveNormBound(**self.norm_bound)
        return s


def strategy_class(name: str) -> Any:
    """The class ``[strategy] name`` selects (None: unknown)."""
    from edgefed.strategies import STRATEGIES

    if name == "dp-fedavg":
        from edgefed.privacy.strategy import DPFedAvg

        return DPFedAvg
    return STRATEGIES.get(name)


def strategy_names() -> tuple[str, ...]:
    from edgefed.strategies import STRATEGIES

    return (*STRATEGIES, "dp-fedavg")


@dataclass
class CoordinatorConfig:
    rounds: int = option(20, min=1, max=1_000_000, doc="federated rounds to run")
    wait_timeout: float = option(
        300.0, above=0, max=86400 * 7, doc="give up if min_devices are not online by then"
    )
    checkpoint: str | None = option(
        None, path="output", doc="checkpoint file, written atomically after every round"
    )
    metrics: str | None = option(None, path="output", doc="JSON lines of per-round metrics")
    round: RoundConfig = field(default_factory=RoundConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    # [sharding]: aggregator workers sum the updates (docs/scale-out.md); None: this process does
    sharding: ShardingConfig | None = None
    # [sharding.transport]: the aggregation client's own account. A secured broker maps one
    # account to one connection (use_username_as_clientid), and the service opens two.
    sharding_transport: TransportConfig | None = None
    # None: downlink unsigned (demo only; warned at start)
    signing_key: str | None = option(
        None, path="file", doc="Ed25519 private key (`edgefed keygen`) signing every downlink"
    )

    @classmethod
    def load(cls, path: str | Path) -> CoordinatorConfig:
        """Read a file: errors name it; relative paths are resolved against its folder and
        the ones that must exist are checked."""
        src = ConfigFile.load(path)
        return cls.from_dict(src.data, src)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: ConfigFile | None = None) -> CoordinatorConfig:
        src = source or ConfigFile(d)
        src.check_sections(
            [*dict.fromkeys(s.name for s in COORDINATOR_FILE), "strategy", "sharding"]
        )
        values: dict[str, Any] = {}
        rc: dict[str, Any] = {}
        for table in TABLES:
            parts = [s for s in COORDINATOR_FILE if s.name == table]
            for s in parts:
                others = [k for o in parts if o is not s for k in o.keys()]  # noqa: SIM118 (Section.keys)
                got = src.read(s, skip=others)
                (rc if s.target is RoundConfig else values).update(got)
        values["round"] = RoundConfig(**rc)
        values["model"] = _model(src)
        values["evaluation"] = _evaluation(src)
        values["transport"] = src.section(TRANSPORT)
        values["strategy"] = _strategy(src, values["round"])
        if "sharding" in src.data:
            t = dict(src.table("sharding"))
            st = t.pop("transport", None)
            if st is not None:
                st = src.table("sharding.transport", src.data["sharding"])
                values["sharding_transport"] = src.section(
                    Section("sharding.transport", TransportConfig, TRANSPORT.fields), st
                )
            values["sharding"] = src.section(SHARDING, t)
        cfg = cls(**values)
        _cross_checks(src, cfg)
        return cfg

    def make_strategy(self) -> Any:
        """A fresh strategy as configured (norm bound and DP included)."""
        return self.strategy.build()


# ---- tables -----------------------------------------------------------------------------------

_R = {  # RoundConfig is defined with the round engine; its ranges and docs live here
    "min_devices": Rule("wait for this many online devices before each round", 1, 10_000_000),
    "fraction": Rule("of online devices sampled per round", above=0, max=1),
    "min_sampled": Rule("sample at least this many devices", min=1),
    "round_timeout": Rule("seconds to collect updates; late ones are dropped", above=0, max=86400),
    "seed": Rule("seed of device sampling and model initialisation", min=0),
    "local_epochs": Rule("passes over local data per round", 1, 1000),
    "batch_size": Rule("local minibatch size", 1, 65536),
    "lr": Rule("device learning rate", above=0, max=100),
    "uplink": Rule('update compression, e.g. "int8", "topk:0.1+int8"'),
    "downlink": Rule("compression of the global weights sent with each task"),
    "error_feedback": Rule("devices keep what compression dropped for the next round"),
    "weak_ram_mb": Rule("devices reporting less RAM train the head only (0: never)", min=0),
    "weak_cores": Rule("...or fewer cores (0: never)", min=0),
    "mode": Rule(
        '"sync" rounds, or "async": buffered asynchronous aggregation (FedBuff); rounds then '
        "counts model versions",
        choices=("sync", "async"),
    ),
    "buffer_size": Rule("async: accepted updates per model version (K)", 1, 1_000_000),
    "max_staleness": Rule(
        "async: updates trained on a model more versions behind are dropped", min=0
    ),
    "max_concurrent": Rule("async: tasks out at once (0: every online device)", min=0),
    "staleness_weight": Rule(
        'async: weight of an update s versions behind: "poly:A" = 1/(1+s)^A, "constant", '
        '"hinge:A,B" = 1 up to B, then 1/(A(s-B)+1)'
    ),
    "upload_budget_s": Rule(
        "adaptive uplink: each device gets the first ladder spec whose upload fits this many "
        'seconds at its reported rate (0: off, every device uses uplink; at most 86400); "auto" '
        "(sync): (budget_ratio - 1) x the median wall time of the last 20 rounds",
    ),  # its range (a number, or the string "auto") is checked by _check_budget
    "budget_ratio": Rule(
        'adaptive uplink, upload_budget_s = "auto": a round holding the slowest link may last '
        "this many times a typical round",
        above=1,
        max=100,
    ),
    "ladder": Rule("adaptive uplink: specs from least to most compressed"),
}


def _round(table: str, *keys: str) -> Section:
    return Section(table, RoundConfig, keys, {k: _R[k] for k in keys})


COORDINATOR_FILE = (
    Section("coordinator", CoordinatorConfig, ("rounds", "wait_timeout", "checkpoint", "metrics")),
    _round(
        "coordinator",
        "min_devices",
        "fraction",
        "min_sampled",
        "round_timeout",
        "seed",
        "mode",
        "buffer_size",
        "max_staleness",
        "max_concurrent",
        "staleness_weight",
    ),
    Section("model", ModelConfig, doc="the federated network"),
    _round("training", "local_epochs", "batch_size", "lr"),
    _round(
        "compression",
        "uplink",
        "downlink",
        "error_feedback",
        "upload_budget_s",
        "budget_ratio",
        "ladder",
    ),
    _round("fleet", "weak_ram_mb", "weak_cores"),
    Section("evaluation", EvaluationConfig),
    Section("security", CoordinatorConfig, ("signing_key",)),
    TRANSPORT,
)
TABLES = ("coordinator", "training", "compression", "fleet", "security")


def _model(src: ConfigFile) -> ModelConfig:
    sec = next(s for s in COORDINATOR_FILE if s.name == "model")
    v = src.read(sec)
    given = [k for k in ("builtin", "dir", "factory") if k in v]
    if len(given) > 1:
        raise src.error(
            "model",
            given[1],
            f"expected only one of builtin, dir, factory, found {' and '.join(given)}",
        )
    if "factory" in v:
        v["factory"] = _resolve_factory(src, v["factory"])
        if "input_shape" not in v:
            raise src.error(
                "model", "input_shape", "expected a list of integers (per-sample shape, no batch "
                "axis) with factory, found nothing"
            )  # fmt: skip
    elif "input_shape" in v:
        raise src.error("model", "input_shape", "only goes with factory (a builtin knows its own)")
    return src.build(sec, v)


def _resolve_factory(src: ConfigFile, spec: str) -> str:
    """``"my_models:make_net"`` -> ``"/abs/dir/my_models.py:make_net"`` (a file beside the
    config) or ``"my_models:make_net"`` (an importable module, found without importing it)."""
    mod, sep, func = spec.rpartition(":")
    if not sep or not mod or not func.isidentifier():
        raise src.error(
            "model", "factory", f'expected "file.py:function" or "module:function", found "{spec}"'
        )
    base = src.base or Path.cwd()
    if mod.endswith(".py") or "/" in mod:
        return f"{src.resolve('model', 'factory', mod, 'file')}:{func}"
    beside = base / (mod.replace(".", "/") + ".py")
    if beside.is_file():
        return f"{beside}:{func}"
    if not all(p.isidentifier() for p in mod.split(".")) or (
        src.base is not None and importlib.util.find_spec(mod.split(".")[0]) is None
    ):
        raise src.error(
            "model", "factory",
            f'expected a .py file beside the config or an importable module, found neither '
            f'{beside} nor a module "{mod}"',
        )  # fmt: skip
    return f"{mod}:{func}"


def _evaluation(src: ConfigFile) -> EvaluationConfig:
    sec = next(s for s in COORDINATOR_FILE if s.name == "evaluation")
    v = src.read(sec)
    if v.get("dataset", "digits") != "digits":
        path = v["dataset"] = src.resolve("evaluation", "dataset", v["dataset"], "file")
        if src.base is not None:  # a file on disk: the arrays must be there (names only read)
            import numpy as np

            try:
                with np.load(path, allow_pickle=False) as z:
                    found = sorted(getattr(z, "files", ["(a .npy array)"]))
            except (OSError, ValueError) as e:
                raise src.error("evaluation", "dataset", f"expected an .npz, {e}") from None
            if not {"x", "y"} <= set(found):
                raise src.error(
                    "evaluation", "dataset",
                    f"expected an .npz with arrays x and y, found arrays {found} in {path}",
                )  # fmt: skip
    return src.build(sec, v)


# What the strategies' and the adaptive bound's parameters mean (their signatures hold the
# types and defaults; this only documents them in docs/configuration.md).
_DOCS = {
    k: Rule(doc)
    for k, doc in {
        "server_lr": "server learning rate applied to the aggregated delta",
        "max_update_norm": "fixed L2 norm bound: larger updates are scaled down to it",
        "mu": "FedProx proximal term weight",
        "beta1": "first-moment decay",
        "beta2": "second-moment decay",
        "tau": "adaptivity (epsilon) of the server optimizer",
        "beta": "fraction trimmed at each end, per coordinate",
        "clip_norm": "per-device L2 clipping norm (the DP sensitivity)",
        "noise_multiplier": "Gaussian noise std / clip_norm",
        "expected_clients": "expected devices per round (the average's denominator)",
        "sample_rate": "per-device sampling probability for the accountant; "
        "default and minimum: [coordinator] fraction",
        "delta": "DP delta at which epsilon is reported",
        "seed": "noise seed (unset: from the OS)",
        "factor": "bound = factor x median norm of recent updates",
        "window": "recent update norms kept",
        "min_history": "norms needed before the history decides",
        "initial": "bound while warming up (unset: factor x this round's median)",
    }.items()
}


def strategy_section(name: str) -> Section:
    """``[strategy]`` for strategy ``name``: keys are its constructor's parameters."""
    return Section("strategy", strategy_class(name), rules=_DOCS)


def _strategy(src: ConfigFile, rc: RoundConfig) -> StrategyConfig:
    t = dict(src.table("strategy"))
    name = t.pop("name", "fedavg")
    names = strategy_names()
    if name not in names:
        found = f'"{name}"' if isinstance(name, str) else repr(name)
        raise src.error("strategy", "name", f"expected one of {', '.join(names)}, found {found}")
    nb = t.pop("norm_bound", None)
    if name == "dp-fedavg":
        # The accountant's sampling probability is the coordinator's: [coordinator] fraction.
        t.setdefault("sample_rate", rc.fraction)
    params = src.read(strategy_section(name), t, skip=("name", "norm_bound"))
    bound = None
    if nb is not None:
        from edgefed.security.norm_bound import AdaptiveNormBound

        nbt = src.table("strategy.norm_bound", src.data["strategy"])
        bound = src.read(Section("strategy.norm_bound", AdaptiveNormBound, rules=_DOCS), nbt)
    cfg = StrategyConfig(name, params, bound)
    try:
        cfg.build()  # the constructors' own range checks, named with the file
    except (ValueError, TypeError) as e:
        section = "strategy.norm_bound" if "norm" in type(e).__name__.lower() else "strategy"
        raise src.error(section, None, str(e)) from None
    return cfg


def _check_budget(src: ConfigFile, cfg: CoordinatorConfig) -> None:
    """``upload_budget_s``: seconds from 0 to 86400 or "auto" (a range on a union type would
    read "a number or a string from 0 ..."); "auto" follows the round time, which async mode
    does not have."""
    from edgefed.coordinator.adaptive import AUTO

    budget = cfg.round.upload_budget_s
    written = src.data.get("compression", {}).get("upload_budget_s", budget)
    if isinstance(budget, str) and budget != AUTO:
        raise src.error(
            "compression", "upload_budget_s",
            f'expected a number from 0 to 86400 or "auto", found {describe_value(written)}',
        )  # fmt: skip
    if not isinstance(budget, str) and not 0 <= budget <= 86400:
        raise src.error(
            "compression", "upload_budget_s",
            f"expected a number from 0 to 86400, found {describe_value(written)}",
        )  # fmt: skip
    if budget == AUTO and cfg.round.mode == "async":
        raise src.error(
            "compression", "upload_budget_s",
            'expected a number of seconds with [coordinator] mode = "async" ("auto" follows the '
            'round time; async has no rounds), found "auto"',
        )  # fmt: skip


def _cross_checks(src: ConfigFile, cfg: CoordinatorConfig) -> None:
    """Rules that join two tables (after everything was read, like mosquitto's config)."""
    from edgefed.codec import CompressionSpec

    for k in ("uplink", "downlink"):
        try:
            CompressionSpec.parse(getattr(cfg.round, k))
        except ValueError as e:
            found = getattr(cfg.round, k)
            raise src.error(
                "compression",
                k,
                f'expected a spec like "int8" or "topk:0.1+int8", found "{found}" ({e})',
            ) from None
    from edgefed.coordinator.adaptive import parse_ladder
    from edgefed.coordinator.staleness import parse_staleness_weight

    try:
        parse_staleness_weight(cfg.round.staleness_weight)
    except ValueError as e:
        raise src.error("coordinator", "staleness_weight", str(e).split(": ", 1)[1]) from None
    _check_budget(src, cfg)
    try:
        parse_ladder(cfg.round.ladder)
    except ValueError as e:
        raise src.error("compression", "ladder", str(e).split(": ", 1)[1]) from None
    st = cfg.strategy
    if st.name == "dp-fedavg" and st.params["sample_rate"] < cfg.round.fraction:
        raise src.error(
            "strategy", "sample_rate",
            f"expected at least [coordinator] fraction ({cfg.round.fraction}): a lower rate "
            f"makes the accountant under-report epsilon, found {st.params['sample_rate']}",
        )  # fmt: skip
    if cfg.sharding is None:
        return
    # Workers only sum (weight * delta) as updates stream in: they never see the other
    # updates, so neither a robust strategy nor a norm bound (fixed, adaptive or DP's
    # clipping) can run on their sums.
    from edgefed.strategies import LinearStrategy

    if not issubclass(strategy_class(st.name), LinearStrategy):
        raise src.error(
            "strategy", "name",
            f"expected a linear strategy (fedavg, fedprox, fedadam, fedyogi) with [sharding], "
            f'found "{st.name}"',
        )  # fmt: skip
    if st.params.get("max_update_norm") is not None:
        raise src.error(
            "strategy", "max_update_norm",
            "cannot apply with [sharding]: workers sum raw updates (streaming); remove one",
        )  # fmt: skip
    if st.norm_bound is not None:
        raise src.error(
            "strategy.norm_bound", None,
            "the adaptive norm bound needs every update of a round before it clips any; "
            "[sharding] aggregates them as they stream in: remove one",
        )  # fmt: skip
