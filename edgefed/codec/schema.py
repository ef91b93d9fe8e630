"""What an update is about: the expected model (names, shapes), its metadata, and limits."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from edgefed.codec.errors import CodecError

__all__ = ["DecodeLimits", "ModelSchema", "UpdateMeta"]

_NAME = re.compile(r"^[A-Za-z0-9_.:/\-\[\]]{1,200}$")
_TEXT = re.compile(r"^[\x20-\x7e]{0,128}$")
MAX_ELEMENTS = 2**32 - 1  # indices are uint32 on the wire


@dataclass(frozen=True)
class DecodeLimits:
    """Hard caps checked before anything is allocated (a peer is not trusted)."""

    max_bytes: int = 1 << 30  # whole payload
    max_header_bytes: int = 1 << 20  # safetensors JSON header
    max_tensors: int = 4096


@dataclass(frozen=True)
class UpdateMeta:
    """Metadata carried with every update (uplink deltas and downlink weights)."""

    round: int
    device_id: str
    num_samples: int
    model_version: str
    kind: Literal["delta", "weights"] = "delta"

    def __post_init__(self) -> None:
        for f in ("round", "num_samples"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**53:
                raise CodecError(f"meta.{f} must be an int in [0, 2^53), got {v!r}")
        for f in ("device_id", "model_version"):
            v = getattr(self, f)
            if not isinstance(v, str) or not _TEXT.match(v):
                raise CodecError(f"meta.{f} must be printable ASCII of at most 128 chars")
        if self.kind not in ("delta", "weights"):
            raise CodecError(f"meta.kind must be 'delta' or 'weights', got {self.kind!r}")

    def to_json(self) -> str:
        d = {
            "round": self.round,
            "device_id": self.device_id,
            "num_samples": self.num_samples,
            "model_version": self.model_version,
            "kind": self.kind,
        }
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UpdateMeta:
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise CodecError(f"meta is not valid JSON: {e}") from None
        keys = {"round", "device_id", "num_samples", "model_version", "kind"}
        if not isinstance(d, dict) or set(d) != keys:
            raise CodecError(f"meta must be an object with exactly the keys {sorted(keys)}")
        return cls(**d)


class ModelSchema(Mapping[str, tuple[int, ...]]):
    """The expected model: tensor name -> shape (all float32). Immutable."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...] | list[int]]) -> None:
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise CodecError(f"bad tensor name {name!r}")
            if not isinstance(shape, tuple | list) or len(shape) > 8:
                raise CodecError(f"tensor {name!r}: shape must be a tuple of at most 8 ints")
            dims = tuple(shape)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
                raise CodecError(f"tensor {name!r}: shape {dims!r} must hold ints >= 0")
            if math.prod(dims) > MAX_ELEMENTS:
                raise CodecError(f"tensor {name!r}: more than 2^32 - 1 elements")
            out[name] = dims
        self._shapes = out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, object]) -> ModelSchema:
        return cls({k: tuple(getattr(v, "shape", ())) for k, v in tensors.items()})

    def __getitem__(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        return f"ModelSchema({self._shapes!r})"

    def size(self, name: str) -> int:
        return math.prod(self._shapes[name])

    @property
    def total_elements(self) -> int:
        return sum(math.prod(s) for s in self._shapes.values())

    def to_json(self) -> str:
        return json.dumps(
            {k: list(v) for k, v in sorted(self._shapes.items())}, separators=(",", ":")
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON: identifies the model layout in state files."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()
