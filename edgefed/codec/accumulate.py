"""Weighted aggregation of many updates straight from their compressed form.

Memory: one float32 sum per tensor plus, only when some update is partial at the
coordinate level (sparse with ``fill="absent"``), one float32 weight array for that
tensor. Dense and top-k tensors add their weight to a per-tensor scalar instead: the
update covers every coordinate (top-k's unsent coordinates are zeros, deferred by
error feedback, so they still count in the average). A tensor missing from an update
gets no weight at all, so partial updates average correctly.

Sparse tensors are queued (up to ``batch`` per tensor, validated on ``add``) and then
added in one cache-blocked C++ pass: scattering 100 top-1% updates one by one into a
40 MB sum is bound by DRAM latency, whereas per L2-sized chunk of coordinates every
queued update's entries land in cache. Queued entries are views of the decoded payloads
(a few hundred kB each), so the queue costs little memory.
"""

from __future__ import annotations

import math

import numpy as np

from edgefed._core import sparse as _s
from edgefed.codec.errors import CodecError
from edgefed.codec.schema import ModelSchema
from edgefed.codec.tensors import SparseTensor
from edgefed.codec.wire import DecodedUpdate

__all__ = ["Accumulator"]


class Accumulator:
    """sums[name] = sum_u w_u * update_u[name]; weight_sums = sum of w_u per coordinate."""

    def __init__(self, schema: ModelSchema, threads: int = 0, batch: int = 32) -> None:
        if not isinstance(schema, ModelSchema):
            raise CodecError("Accumulator needs a ModelSchema")
        self.schema = schema
        self.threads = threads
        self.batch = max(1, batch)
        self._pending: dict[str, list[tuple[np.ndarray, np.ndarray, float, float, bool]]] = {}
        self.count = 0
        self.kind: str | None = None
        self._sums: dict[str, np.ndarray] = {}
        self._dense_w: dict[str, float] = {}
        self._coord_w: dict[str, np.ndarray] = {}

    def add(self, update: DecodedUpdate, weight: float, scale: float = 1.0) -> None:
        """Add ``weight * scale * update`` with weight ``weight`` (``scale`` < 1: a norm-bounded
        update counts with its full weight but shrunk values); validated first, so a
        rejected update changes nothing."""
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise CodecError(f"weight must be finite and >= 0, got {weight!r}")
        c = float(scale)
        if not (math.isfinite(c) and c >= 0):
            raise CodecError(f"scale must be finite and >= 0, got {scale!r}")
        if self.kind is not None and update.meta.kind != self.kind:
            raise CodecError(f"cannot mix {update.meta.kind!r} updates into {self.kind!r} sums")
        for name, t in update.tensors.items():
            if self.schema.get(name) != t.shape:
                raise CodecError(f"tensor {name!r} does not match the accumulator schema")
            if isinstance(t, SparseTensor) and not t.validated:
                try:  # decode_update guarantees this; hand-built tensors are checked here
                    _s.check_indices(t.indices, self.schema.size(name))
                except (ValueError, TypeError) as e:
                    raise CodecError(f"tensor {name!r}: {e}") from None
                if t.indices.shape != t.values.shape:
                    raise CodecError(f"tensor {name!r}: indices and values lengths disagree")
                if t.values.dtype not in (np.float32, np.float16, np.int8):
                    raise CodecError(f"tensor {name!r}: values must be float32/float16/int8")
                vals = t.values.astype(np.float32)
                if not (np.isfinite(vals).all() and math.isfinite(t.scale) and t.scale >= 0):
                    raise CodecError(f"tensor {name!r}: values or scale not finite")
        self.kind = update.meta.kind
        for name, t in update.tensors.items():
            n = self.schema.size(name)
            sums = self._sums.get(name)
            if sums is None:
                sums = self._sums[name] = np.zeros(n, np.float32)
            if t.fill == "absent" and name not in self._coord_w:
                self._coord_w[name] = np.zeros(n, np.float32)
            if t.fill != "absent":
                self._dense_w[name] = self._dense_w.get(name, 0.0) + w
            if isinstance(t, SparseTensor):
                scale = t.scale if t.values.dtype == np.int8 else 1.0
                absent = t.fill == "absent"
                q = self._pending.setdefault(name, [])
                q.append((t.indices, t.values, scale, w * c, absent))
                if absent and c != 1.0:  # the kernel added w * c to these weights
                    self._coord_w[name][t.indices] += np.float32(w - w * c)
                if len(q) >= self.batch:
                    self._flush(name)
            else:
                t.accumulate(sums, None, w * c, self.threads)
        self.count += 1

    def _flush(self, name: str | None = None) -> None:
        for key in [name] if name is not None else list(self._pending):
            items = self._pending.pop(key, [])
            if items:
                _s.acc_sparse_batch(
                    self._sums[key], self._coord_w.get(key), items, 1 << 12, self.threads
                )

    def _weights(self, name: str) -> np.ndarray:
        n = self.schema.size(name)
        out = np.full(n, self._dense_w.get(name, 0.0), np.float32)
        if name in self._coord_w:
            out += self._coord_w[name]
        return out

    def take(self, name: str) -> tuple[np.ndarray, float | np.ndarray]:
        """The sum of one tensor (the accumulator's own array, shaped: divide it in place
        for the mean without a second model-sized buffer) and its weight: a scalar unless
        some update was partial at the coordinate level, then a per-coordinate array."""
        self._flush(name)
        shape = self.schema[name]
        s = self._sums.get(name)
        if s is None:
            s = self._sums[name] = np.zeros(self.schema.size(name), np.float32)
        if name in self._coord_w:
            return s.reshape(shape), self._weights(name).reshape(shape)
        return s.reshape(shape), self._dense_w.get(name, 0.0)

    def result(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(sums, weight_sums), shaped like the schema; untouched tensors are zeros."""
        self._flush()
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
        self._flush()
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
