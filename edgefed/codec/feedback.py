"""Error-feedback state of one device: a float32 residual per tensor, kept across rounds.

Persisted as a safetensors file (same container as the wire format) so it survives a
restart: ``format`` = ``"edgefed.feedback"``, ``version`` = ``"1"``, the model schema
JSON and a sha256 over schema + body. ``save`` is atomic (temporary file in the same
directory, fsync, ``os.replace``, fsync of the directory): a crash leaves either the old
or the new state, never a torn file. ``load`` validates everything a wire payload gets.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from edgefed._core import sparse as _s
from edgefed.atomic import atomic_write
from edgefed.codec.container import read_container, write_container
from edgefed.codec.errors import CodecError
from edgefed.codec.schema import ModelSchema

__all__ = ["ErrorFeedback"]

_FORMAT, _VERSION = "edgefed.feedback", "1"


def _digest(schema_json: str, body: list[memoryview]) -> str:
    h = hashlib.sha256(f"{_FORMAT}/{_VERSION}\n{schema_json}\n".encode())
    for part in body:
        h.update(part)
    return h.hexdigest()


class ErrorFeedback:
    """Residuals keyed by tensor name; created lazily as zeros of the schema's shape."""

    def __init__(self, schema: ModelSchema) -> None:
        if not isinstance(schema, ModelSchema):
            raise CodecError("ErrorFeedback needs a ModelSchema")
        self.schema = schema
        self._res: dict[str, np.ndarray] = {}

    def residual(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The flat float32 residual of ``name`` (updated in place by encode_update)."""
        if name not in self.schema:
            raise CodecError(f"tensor {name!r} is not in the feedback schema")
        if shape is not None and tuple(shape) != self.schema[name]:
            raise CodecError(f"tensor {name!r}: shape {tuple(shape)} != {self.schema[name]}")
        r = self._res.get(name)
        if r is None:
            r = self._res[name] = np.zeros(self.schema.size(name), np.float32)
        return r

    def residuals(self) -> dict[str, np.ndarray]:
        return {k: v.reshape(self.schema[k]) for k, v in self._res.items()}

    def norm(self) -> float:
        return math.sqrt(sum(float(np.dot(v, v)) for v in self._res.values()))

    def reset(self) -> None:
        self._res.clear()

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        schema_json = self.schema.to_json()
        arrays = sorted(self._res.items())
        md = {"format": _FORMAT, "version": _VERSION, "schema": schema_json}

        def finalize(body: list[memoryview]) -> dict[str, str]:
            return {**md, "sha256": _digest(schema_json, body)}

        data = write_container(arrays, md, finalize)
        atomic_write(path, data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], schema: ModelSchema | None = None) -> ErrorFeedback:
        """Read a saved state; with ``schema`` it must describe the same model."""
        path = Path(path)
        limit = 1 << 20 if schema is None else 8 * len(schema) * 64 + (1 << 20)
        limit += 4 * (schema.total_elements if schema is not None else 0)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise CodecError(f"cannot read feedback state {path}: {e.strerror}") from None
        if schema is None:
            limit = size  # schema comes from the file; it is checked against the body below
        if size > limit:
            raise CodecError(f"feedback state of {size} bytes is larger than the model allows")
        data = path.read_bytes()
        md, entries, body0 = read_container(data, len(data), 1 << 24, 1 << 16)
        if md.get("format") != _FORMAT or md.get("version") != _VERSION:
            raise CodecError("not an edgefed.feedback v1 file")
        if set(md) != {"format", "version", "schema", "sha256"}:
            raise CodecError("feedback metadata must hold format, version, schema, sha256")
        try:
            file_schema = ModelSchema(json.loads(md["schema"]))
        except (ValueError, TypeError, AttributeError, RecursionError):
            raise CodecError("feedback schema is not valid") from None
        if schema is not None and file_schema.to_json() != schema.to_json():
            raise CodecError("feedback state was saved for a different model")
        if _digest(md["schema"], [memoryview(data)[body0:]]) != md["sha256"]:
            raise CodecError("feedback state is corrupted: sha256 mismatch")
        ef = cls(schema or file_schema)
        for name, e in entries.items():
            if name not in ef.schema:
                raise CodecError(f"feedback state has unknown tensor {name!r}")
            if e.dtype != "F32" or e.shape != (ef.schema.size(name),):
                raise CodecError(f"feedback tensor {name!r} has the wrong dtype or size")
            v = e.view(data).copy()
            if not _s.all_finite(v, 0):
                raise CodecError(f"feedback tensor {name!r} contains NaN or Inf")
            ef._res[name] = v
        return ef
