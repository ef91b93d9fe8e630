"""One reader for every edgefed TOML file: coordinator, device agent, aggregator worker, transport.

Why one module: the configuration used to be read four ways (a type table, a ``_table``
helper, a key set, dataclass fields) with defaults repeated between them. Modelled on
mosquitto's ``conf.c``: typed helpers check each value, defaults live in ONE place (the
dataclass a section fills, or the signature of the object a section configures), and checks
across options run after the whole file is read.

* A section's keys, their types and defaults are the fields of its dataclass (or the
  parameters of a callable); the schema only adds what a type cannot say: a range, the
  allowed choices, how a path is resolved, and one line of documentation (a :class:`Rule`,
  in the field's metadata via :func:`option`, or a rules table for a dataclass defined
  elsewhere).
* Every mistake is ONE line naming file, section, key, what was expected and what was
  found: ``coordinator.toml: [coordinator] rounds: expected an integer, found the string "3"``
  (:class:`ConfigError`, a ``ValueError``).
* Paths are relative to the config file; a path that must exist is checked and reported
  with the key and the resolved path.

Standard library only: the device agent reads its config through this module, and the
device side imports no torch (and nothing else it does not need).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "ConfigFile",
    "FieldError",
    "Key",
    "Rule",
    "Section",
    "check_fields",
    "describe_type",
    "describe_value",
    "option",
]


class ConfigError(ValueError):
    """One line: ``<file>: [<section>] <key>: <what was expected, what was found>``."""

    def __init__(self, file: str, section: str | None, key: str | None, message: str) -> None:
        where = file
        if section:
            where += f": [{section}]"
        if key:
            where += f" {key}"
        super().__init__(f"{where}: {message}")
        self.file, self.section, self.key, self.message = file, section, key, message


class FieldError(ValueError):
    """A bad value found by a dataclass's own check (``__post_init__``); :class:`ConfigFile`
    turns it into a :class:`ConfigError` naming the file. Alone it names section and key."""

    def __init__(self, section: str, key: str | None, message: str) -> None:
        super().__init__(f"[{section}] {key}: {message}" if key else f"[{section}] {message}")
        self.section, self.key, self.message = section, key, message


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a key's type cannot say. ``path``: ``"file"``/``"dir"`` (resolved against the
    config file's folder and must exist), ``"output"`` (resolved only)."""

    doc: str = ""
    min: float | None = None
    max: float | None = None
    above: float | None = None  # exclusive lower bound
    choices: tuple[Any, ...] = ()
    path: str | None = None
    key: str | None = None  # TOML key when it differs from the field name


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rule: Any):
    """A dataclass field carrying its :class:`Rule` (the default stays the field's own)."""
    return dataclasses.field(
        default=default, default_factory=factory, metadata={"rule": Rule(**rule)}
    )


@dataclasses.dataclass(frozen=True)
class Key:
    """One key of a section: where it goes (``field``), its type, default and rule."""

    name: str
    field: str
    type: Any
    default: Any  # dataclasses.MISSING / inspect.Parameter.empty: required
    rule: Rule

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def default_text(self) -> str:
        if self.required:
            return "required"
        return _toml_text(self.default)


@dataclasses.dataclass(frozen=True)
class Section:
    """A TOML table filled into ``target``: a dataclass (keys = its fields, or the subset
    ``fields``) or a callable (keys = its parameters, see :meth:`from_callable`)."""

    name: str
    target: Any
    fields: tuple[str, ...] | None = None
    rules: Mapping[str, Rule] = dataclasses.field(default_factory=dict)
    doc: str = ""

    def keys(self) -> dict[str, Key]:
        if not dataclasses.is_dataclass(self.target):
            return _callable_keys(self.target, self.fields, self.rules)
        hints = typing.get_type_hints(self.target)
        out: dict[str, Key] = {}
        for f in dataclasses.fields(self.target):
            if self.fields is not None and f.name not in self.fields:
                continue
            if self.fields is None and not f.init:
                continue
            rule = f.metadata.get("rule") or self.rules.get(f.name) or Rule()
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            key = rule.key or f.name
            out[key] = Key(key, f.name, hints[f.name], default, rule)
        if self.fields is not None and set(self.fields) - {k.field for k in out.values()}:
            missing = sorted(set(self.fields) - {k.field for k in out.values()})
            raise TypeError(f"schema [{self.name}]: {self.target.__name__} has no field {missing}")
        return out


def _callable_keys(
    fn: Callable[..., Any], only: Iterable[str] | None, rules: Mapping[str, Rule]
) -> dict[str, Key]:
    """Keys from a callable's keyword parameters: its signature is the source of defaults."""
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    hints = typing.get_type_hints(target)
    out: dict[str, Key] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (only is not None and p.name not in only):
            continue
        default = dataclasses.MISSING if p.default is p.empty else p.default
        out[p.name] = Key(
            p.name, p.name, hints.get(p.name, Any), default, rules.get(p.name, Rule())
        )
    return out


# ---- types: what a value must be, and how to say so ----------------------------------------

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return None


def describe_type(tp: Any) -> str:
    """``int`` -> "an integer", ``list[int] | None`` -> "a list of integers"."""
    args = _union_args(tp)
    if args is not None:
        return " or ".join(describe_type(a) for a in args)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return f"a list of {_PLURALS.get(inner, 'values')}"
    if tp is dict or origin is dict:
        return "a table"
    return _NAMES.get(tp, "a value")


def _accepts(tp: Any, v: Any) -> bool:
    args = _union_args(tp)
    if args is not None:
        return any(_accepts(a, v) for a in args)
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, str)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return isinstance(v, list) and all(_accepts(inner, x) for x in v)
    if tp is dict or origin is dict:
        return isinstance(v, dict)
    raise TypeError(f"config schema: unsupported field type {tp!r}")


def _convert(tp: Any, v: Any) -> Any:
    """The value as the field stores it: ints given for a float field become floats."""
    args = _union_args(tp)
    if args is not None:
        for a in args:  # first member that takes it: int before float keeps 3 an int
            if _accepts(a, v):
                return _convert(a, v)
    if tp is float:
        return float(v)
    if typing.get_origin(tp) is tuple:
        return tuple(v)
    return v


def describe_value(v: Any) -> str:
    """How a found value is named in an error: ``the string "3"``, ``the integer 0``."""
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v}"
    if isinstance(v, str):
        s = json.dumps(v)
        return f"the string {s if len(s) <= 80 else s[:76] + '...' + chr(34)}"
    if isinstance(v, list):
        s = json.dumps(v, default=str)
        return f"the list {s if len(s) <= 80 else s[:76] + ' ...]'}"
    if isinstance(v, dict):
        return "a table"
    return f"the {type(v).__name__} {v}"


def _toml_text(v: Any) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_text(x) for x in v) + "]"
    if dataclasses.is_dataclass(v) or isinstance(v, dict):
        return "(table)"
    return str(v)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _range_text(r: Rule) -> str:
    """``"from 1 to 64"``, ``"above 0"``, ``"at least 1"``, ``"above 0 and at most 1"``."""
    if r.above is not None:
        tail = f" and at most {_num(r.max)}" if r.max is not None else ""
        return f"above {_num(r.above)}{tail}"
    if r.min is not None and r.max is not None:
        return f"from {_num(r.min)} to {_num(r.max)}"
    if r.min is not None:
        return f"at least {_num(r.min)}"
    return f"at most {_num(r.max)}"  # type: ignore[arg-type]


def check_rule(key: str, tp: Any, r: Rule, v: Any) -> str | None:
    """The complaint about a well-typed value (range, choices, finiteness), or None."""
    if r.choices and v not in r.choices:
        allowed = ", ".join(_toml_text(c) for c in r.choices)
        return f"expected one of {allowed}, found {describe_value(v)}"
    is_list = isinstance(v, list | tuple)
    nums = [x for x in (v if is_list else [v]) if isinstance(x, int | float)]
    for x in nums:
        if isinstance(x, bool):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            return f"expected a finite number, found {describe_value(v)}"
        bad = (
            (r.min is not None and x < r.min)
            or (r.max is not None and x > r.max)
            or (r.above is not None and x <= r.above)
        )
        if bad:
            if is_list:
                what = f"{describe_type(tp)}, each {_range_text(r)}"
                return f"expected {what}, found {describe_value(v)}"
            return f"expected {describe_type(tp)} {_range_text(r)}, found {describe_value(v)}"
    return None


def check_fields(obj: Any, section: str) -> None:
    """Range and choice rules of a dataclass instance (for ``__post_init__``: the same rules
    hold for an object built in Python as for one read from a file). Raises FieldError."""
    for k in Section(section, type(obj)).keys().values():
        v = getattr(obj, k.field)
        if v is None:
            continue
        msg = check_rule(k.name, k.type, k.rule, v)
        if msg:
            raise FieldError(section, k.name, msg)


# ---- the file --------------------------------------------------------------------------------


class ConfigFile:
    """A parsed TOML document and where it came from. Built from a file (:meth:`load`: paths
    are resolved against its folder and checked) or from a dict (``name`` labels errors;
    paths are kept as given and not checked, for configs built in Python)."""

    def __init__(
        self, data: Mapping[str, Any], path: str | Path | None = None, name: str = ""
    ) -> None:
        self.data = dict(data)
        self.path = Path(path) if path is not None else None
        self.name = str(path) if path is not None else (name or "<config>")
        self.base = self.path.resolve().parent if self.path is not None else None

    @classmethod
    def load(cls, path: str | Path) -> ConfigFile:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(str(path), None, None, "no such file") from None
        except OSError as e:
            raise ConfigError(str(path), None, None, f"cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(path), None, None, f"not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(str(path), None, None, "not valid TOML: not UTF-8 text") from None
        return cls(data, path)

    def error(self, section: str | None, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.name, section, key, message)

    def check_sections(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for s in self.data:
            if s not in allowed:
                raise self.error(s, None, f"unknown section (expected one of {', '.join(allowed)})")

    def table(self, name: str, parent: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The table ``name`` ({} when absent); a dotted ``name`` is looked up in ``parent``."""
        v = (self.data if parent is None else parent).get(name.rsplit(".", 1)[-1], {})
        if not isinstance(v, dict):
            raise self.error(None, None, f"[{name}]: expected a table, found {describe_value(v)}")
        return v

    def read(
        self, section: Section, table: Mapping[str, Any] | None = None, *, skip: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Checked values of ``section`` by field name (only the keys present). Keys in
        ``skip`` are left to the caller (sub-tables, keys another section reads)."""
        t = self.table(section.name) if table is None else table
        keys = section.keys()
        skip = set(skip)
        for k in t:
            if k not in keys and k not in skip:
                expected = ", ".join([*keys, *sorted(skip)])
                raise self.error(section.name, k, f"unknown key (expected one of {expected})")
        out: dict[str, Any] = {}
        for name, key in keys.items():
            if name not in t:
                if key.required:
                    raise self.error(
                        section.name, name, f"expected {describe_type(key.type)}, found nothing"
                    )
                continue
            out[key.field] = self.value(section.name, key, t[name])
        return out

    def value(self, section: str, key: Key, v: Any) -> Any:
        if not _accepts(key.type, v):
            found = describe_value(v)
            raise self.error(
                section, key.name, f"expected {describe_type(key.type)}, found {found}"
            )
        msg = check_rule(key.name, key.type, key.rule, v)  # on the value as written
        if msg:
            raise self.error(section, key.name, msg)
        v = _convert(key.type, v)
        if key.rule.path and isinstance(v, str):
            v = self.resolve(section, key.name, v, key.rule.path)
        return v

    def resolve(self, section: str, key: str, value: str, kind: str = "output") -> str:
        """``value`` made absolute against the config file's folder; ``kind`` ``"file"`` or
        ``"dir"`` must exist. A config built from a dict keeps its paths as given."""
        if self.base is None:
            return value
        p = Path(value).expanduser()
        p = p if p.is_absolute() else self.base / p
        if kind == "file" and not p.is_file():
            found = "a directory" if p.is_dir() else "nothing"
            raise self.error(section, key, f"expected an existing file, found {found} at {p}")
        if kind == "dir" and not p.is_dir():
            found = "a file" if p.exists() else "nothing"
            raise self.error(section, key, f"expected an existing directory, found {found} at {p}")
        return str(p)

    def build(self, section: Section, values: Mapping[str, Any]) -> Any:
        """``section.target(**values)``; its own checks' errors are named with this file."""
        try:
            return section.target(**values)
        except FieldError as e:
            raise self.error(e.section, e.key, e.message) from None
        except (ValueError, TypeError) as e:
            raise self.error(section.name, None, str(e)) from None

    def section(
        self, section: Section, table: Mapping[str, Any] | None = None, **extra: Any
    ) -> Any:
        """Read and build in one step (``extra`` overrides or adds constructor values)."""
        return self.build(section, {**self.read(section, table), **extra})
