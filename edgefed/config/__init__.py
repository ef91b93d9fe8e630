"""The configuration schema every edgefed role reads its TOML through (see ``schema``)."""

from edgefed.config.schema import (
    ConfigError,
    ConfigFile,
    FieldError,
    Key,
    Rule,
    Section,
    check_fields,
    option,
)

__all__ = [
    "ConfigError",
    "ConfigFile",
    "FieldError",
    "Key",
    "Rule",
    "Section",
    "check_fields",
    "option",
]
