"""The configuration schema every edgefed role reads its TOML through: ``edgefed.config.schema``
(the reader and its typed helpers) and ``edgefed.config.docs`` (docs/configuration.md)."""
