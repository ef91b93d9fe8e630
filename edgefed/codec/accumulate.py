"""Weighted aggregation of many updates straight from their compressed form.

Memory: one float32 sum per tensor plus, only when some update is partial at the
coordinate level (sparse with ``fill="absent"``), one float32 weight array for that
tensor. Dense and top-k tensors add their weight to a per-tensor scalar instead: the
update covers every coordinate (top-k's unsent coordinates are zeros, deferred by
error feedback, so they still count in the average). A tensor missing from an update
gets no weight at all, so partial updates average correctly.
"""

from __future__ import annotations

import math

import numpy as np

from edgefed.codec.errors import CodecError
from edgefed.codec.schema import ModelSchema
from edgefed.codec.wire import DecodedUpdate

__all__ = ["Accumulator"]


class Accumulator:
    """sums[name] = sum_u w_u * update_u[name]; weight_sums = sum of w_u per coordinate."""

    def __init__(self, schema: ModelSchema, threads: int = 0) -> None:
        if not isinstance(schema, ModelSchema):
            raise CodecError("Accumulator needs a ModelSchema")
        self.schema = schema
        self.threads = threads
        self.count = 0
        self.kind: str | None = None
        self._sums: dict[str, np.ndarray] = {}
        self._dense_w: dict[str, float] = {}
        self._coord_w: dict[str, np.ndarray] = {}

    def add(self, update: DecodedUpdate, weight: float) -> None:
        """Add ``weight * update``; validated first, so a rejected update changes nothing."""
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise CodecError(f"weight must be finite and >= 0, got {weight!r}")
        if self.kind is not None and update.meta.kind != self.kind:
            raise CodecError(f"cannot mix {update.meta.kind!r} updates into {self.kind!r} sums")
        for name, t in update.tensors.items():
            if self.schema.get(name) != t.shape:
                raise CodecError(f"tensor {name!r} does not match the accumulator schema")
        self.kind = update.meta.kind
        for name, t in update.tensors.items():
            n = self.schema.size(name)
            sums = self._sums.get(name)
            if sums is None:
                sums = self._sums[name] = np.zeros(n, np.float32)
            if t.fill == "absent":
                cw = self._coord_w.get(name)
                if cw is None:
                    cw = self._coord_w[name] = np.zeros(n, np.float32)
                t.accumulate(sums, cw, w, self.threads)
            else:
                t.accumulate(sums, None, w, self.threads)
                self._dense_w[name] = self._dense_w.get(name, 0.0) + w
        self.count += 1

    def _weights(self, name: str) -> np.ndarray:
        n = self.schema.size(name)
        out = np.full(n, self._dense_w.get(name, 0.0), np.float32)
        if name in self._coord_w:
            out += self._coord_w[name]
        return out

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(sums, weight_sums), shaped like the schema; untouched tensors are zeros."""
        sums, weights = {}, {}
        for name, shape in self.schema.items():
            s = self._sums.get(name)
            sums[name] = (s if s is not None else np.zeros(shape, np.float32)).reshape(shape)
            weights[name] = self._weights(name).reshape(shape)
        return sums, weights

    def average(self) -> dict[str, np.ndarray]:
        """sums / weight_sums per coordinate; 0 where nothing was received.

        Tensors without coordinate-level weights divide by their scalar, so no weight
        array is materialised (keeps peak memory at about two model copies).
        """
        out = {}
        for name, shape in self.schema.items():
            s = self._sums.get(name)
            if s is None:
                out[name] = np.zeros(shape, np.float32)
                continue
            dw = self._dense_w.get(name, 0.0)
            if name not in self._coord_w:
                avg = s / np.float32(dw) if dw > 0 else np.zeros_like(s)
            else:
                wts = self._coord_w[name] + np.float32(dw)
                avg = np.divide(s, wts, out=np.zeros_like(s), where=wts > 0)
            out[name] = avg.reshape(shape)
        return out
