"""The partial-aggregate message a worker sends the coordinator when a round closes.

Same container and validation style as the update wire format (``edgefed.codec``): one
safetensors file whose ``__metadata__`` holds ``format`` = ``"edgefed.partial"``,
``version`` = ``"1"``, ``meta`` (JSON, below) and ``sha256`` over
``b"edgefed.partial/1\\n" + meta + b"\\n" + body``. Entries, for every tensor of the
model when the partial counts at least one update (none for an empty partial):

- ``<name>/s``: float32 ``[n]``, the weighted sums ``sum_u w_u * update_u``;
- ``<name>/w``: float32 ``[1]`` when every coordinate has the same weight sum (dense and
  top-k tensors: the common case, 4 bytes instead of 4n) or ``[n]`` per coordinate.

``meta``: ``round``, ``worker``, ``instance`` (random per worker process: fences a worker
declared dead), ``amendment`` (0, then +1 per re-issue without conflicting keys),
``schema_digest`` (the model layout), ``keys`` (``[device, round, update_id]`` per counted
update, no device twice), ``weight_total`` (sum of weights) and ``rejected`` (updates the
worker dropped, for metrics).

A partial comes from a peer and is not trusted: sizes are derived from the coordinator's
own schema before anything is viewed, every number is type- and range-checked, sums must
be finite, weights finite, >= 0 and not above ``weight_total``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from edgefed._core import sparse as _s
from edgefed.codec import CodecError, ModelSchema
from edgefed.codec.container import read_container, write_container

__all__ = ["FORMAT", "VERSION", "Key", "Partial", "decode_partial", "encode_partial"]

FORMAT, VERSION = "edgefed.partial", "1"
Key = tuple[str, int, str]  # (device, round, update id)
_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_META_KEYS = {
    "round",
    "worker",
    "instance",
    "amendment",
    "schema_digest",
    "keys",
    "weight_total",
    "rejected",
}


@dataclass
class Partial:
    """Weighted sums of one worker's accepted updates (flat float32 arrays per tensor)."""

    round: int
    worker: str
    instance: str
    schema_digest: str
    keys: list[Key] = field(default_factory=list)
    weight_total: float = 0.0
    rejected: int = 0
    amendment: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    nbytes: int = 0

    @property
    def count(self) -> int:
        return len(self.keys)

    @property
    def devices(self) -> set[str]:
        return {k[0] for k in self.keys}


def _digest(meta: str, body: list[memoryview]) -> str:
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\n".encode())
    h.update(meta.encode())
    h.update(b"\n")
    for part in body:
        h.update(part)
    return h.hexdigest()


def compact_weights(w: np.ndarray) -> np.ndarray:
    """A per-coordinate weight array as float32 [1] when all equal, else flat [n]."""
    flat = np.ascontiguousarray(w, np.float32).reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return flat[:1].copy()
    return flat


def encode_partial(p: Partial) -> bytes:
    """Serialise ``p``; ``p.weights`` may be [1] or [n] per tensor (see module doc)."""
    arrays: list[tuple[str, np.ndarray]] = []
    if p.keys:
        for name in sorted(p.sums):
            arrays.append((f"{name}/s", np.ascontiguousarray(p.sums[name], np.float32).ravel()))
            arrays.append((f"{name}/w", compact_weights(p.weights[name])))
    meta = json.dumps(
        {
            "round": p.round,
            "worker": p.worker,
            "instance": p.instance,
            "amendment": p.amendment,
            "schema_digest": p.schema_digest,
            "keys": [list(k) for k in p.keys],
            "weight_total": float(p.weight_total),
            "rejected": p.rejected,
        },
        separators=(",", ":"),
        allow_nan=False,
    )
    md = {"format": FORMAT, "version": VERSION, "meta": meta}

    def finalize(body: list[memoryview]) -> dict[str, str]:
        return {**md, "sha256": _digest(meta, body)}

    return write_container(arrays, md, finalize)


def _int(d: dict, key: str, hi: int = 2**53) -> int:
    v = d[key]
    if type(v) is not int or not 0 <= v < hi:
        raise CodecError(f"partial meta.{key} must be an int in [0, {hi}), got {v!r}")
    return v


def _keys(raw: object, rnd: int | None, max_keys: int) -> list[Key]:
    if not isinstance(raw, list) or len(raw) > max_keys:
        raise CodecError(f"partial meta.keys must be a list of at most {max_keys} keys")
    out: list[Key] = []
    devices: set[str] = set()
    for k in raw:
        if (
            not isinstance(k, list)
            or len(k) != 3
            or not isinstance(k[0], str)
            or not _ID.match(k[0])
            or type(k[1]) is not int
            or not isinstance(k[2], str)
            or not _ID.match(k[2])
        ):
            raise CodecError(f"partial key {str(k)[:80]} is not [device, round, update_id]")
        if rnd is not None and k[1] != rnd:
            raise CodecError(f"partial key for device {k[0]!r} is for round {k[1]}, not {rnd}")
        if k[0] in devices:
            raise CodecError(f"partial counts device {k[0]!r} twice")
        devices.add(k[0])
        out.append((k[0], k[1], k[2]))
    return out


def decode_partial(
    payload: bytes, schema: ModelSchema, *, max_keys: int = 1_000_000, task_rounds: bool = False
) -> Partial:
    """Validate and decode a partial against the coordinator's schema (CodecError if bad).
    ``task_rounds``: an asynchronous buffer's partial, whose keys name each update's task
    round (any), not the buffer's."""
    if not isinstance(schema, ModelSchema):
        raise CodecError("schema must be a ModelSchema")
    body_cap = sum(8 * schema.size(n) for n in schema)
    header_cap = 64 * 1024 + 160 * len(schema) + 100 * max_keys
    md, entries, body0 = read_container(
        payload, body_cap + header_cap + 8, header_cap, 2 * len(schema)
    )
    if md.get("format") != FORMAT or md.get("version") != VERSION:
        raise CodecError(f"not an {FORMAT} v{VERSION} payload")
    if set(md) != {"format", "version", "meta", "sha256"}:
        raise CodecError("partial metadata must hold exactly format, version, meta, sha256")
    try:
        meta = json.loads(md["meta"])
    except (ValueError, RecursionError):
        raise CodecError("partial meta is not valid JSON") from None
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise CodecError(f"partial meta must have exactly the keys {sorted(_META_KEYS)}")
    rnd = _int(meta, "round")
    amendment = _int(meta, "amendment", 1 << 20)
    rejected = _int(meta, "rejected")
    for f in ("worker", "instance"):
        if not isinstance(meta[f], str) or not _ID.match(meta[f]):
            raise CodecError(f"partial meta.{f} must be 1-64 characters of [A-Za-z0-9_.-]")
    if meta["schema_digest"] != schema.digest():
        raise CodecError("partial was computed for another model layout (schema digest)")
    wt = meta["weight_total"]
    if isinstance(wt, bool) or not isinstance(wt, int | float) or not math.isfinite(wt) or wt < 0:
        raise CodecError("partial meta.weight_total must be a finite number >= 0")
    keys = _keys(meta["keys"], None if task_rounds else rnd, max_keys)
    p = bytes(payload) if not isinstance(payload, bytes) else payload
    if _digest(md["meta"], [memoryview(p)[body0:]]) != md["sha256"]:
        raise CodecError("partial integrity check failed: sha256 mismatch")
    expected = {f"{n}/{s}" for n in schema for s in "sw"} if keys else set()
    if set(entries) != expected:
        extra = sorted(set(entries) ^ expected)[:3]
        raise CodecError(f"partial entries do not match the model (e.g. {extra})")
    sums: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    cap = float(wt) * (1 + 1e-5) + 1e-3  # float32 sums of the same weights
    for name in schema if keys else ():
        n = schema.size(name)
        es, ew = entries[f"{name}/s"], entries[f"{name}/w"]
        if es.dtype != "F32" or es.shape != (n,):
            raise CodecError(f"partial tensor {name!r}: sums must be F32[{n}]")
        if ew.dtype != "F32" or ew.shape not in ((1,), (n,)):
            raise CodecError(f"partial tensor {name!r}: weights must be F32[1] or F32[{n}]")
        s, w = es.view(p), ew.view(p)
        if n and not _s.all_finite(s, 0):
            raise CodecError(f"partial tensor {name!r}: sums contain NaN or Inf")
        if not _s.all_finite(w, 0) or (w.size and (w.min() < 0 or w.max() > cap)):
            raise CodecError(f"partial tensor {name!r}: weights must be in [0, weight_total]")
        sums[name], weights[name] = s, w
    return Partial(
        rnd, meta["worker"], meta["instance"], meta["schema_digest"], keys, float(wt),
        rejected, amendment, sums, weights, len(p),
    )  # fmt: skip
