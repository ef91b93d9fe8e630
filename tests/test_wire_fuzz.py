"""Wire format v1 (safetensors) under attack: hand-built malicious payloads (one per check)
and hypothesis properties (round trip, error bounds, mutated / truncated bytes). v1 is
retired on devices but the coordinator's intake still reads it (a device outbox stored
before v2 is resent as is), so its checks stay tested through ``accept_v1=True``; the
compact v2 has its own file, tests/test_codec_compact.py."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefed.codec import (
    CodecError,
    DecodedUpdate,
    ModelSchema,
    UpdateMeta,
    decode_update,
    encode_update,
)

SCHEMA = ModelSchema({"w": (40, 50), "b": (50,)})
META = UpdateMeta(round=1, device_id="d", num_samples=5, model_version="v1", kind="delta")


def frame(header: object, body: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + body


def split(payload: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def resign(header: dict, body: bytes) -> bytes:
    """Rebuild a payload with a correct digest, so deeper checks are reached."""
    md = header["__metadata__"]
    h = hashlib.sha256(b"edgefed.update/1\n")
    h.update(md["meta"].encode() + b"\n" + md["tensors"].encode() + b"\n" + body)
    md["sha256"] = h.hexdigest()
    return frame(header, body)


def valid(spec: str = "topk:0.05+int8", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    upd = {k: rng.standard_normal(s).astype(np.float32) for k, s in SCHEMA.items()}
    return encode_update(upd, META, f"{spec}; min_elements=100; small=none", version=1)


def check_decoded(u: DecodedUpdate) -> None:
    for name, arr in u.to_dense().items():
        assert arr.shape == SCHEMA[name] and arr.dtype == np.float32
        assert np.isfinite(arr).all()


# ------------------------------------------------------------------ hand-built attacks


def mutate_tensors(payload: bytes, fn) -> bytes:
    header, body = split(payload)
    descs = json.loads(header["__metadata__"]["tensors"])
    fn(descs)
    header["__metadata__"]["tensors"] = json.dumps(descs)
    return resign(header, body)


def mutate_entries(payload: bytes, fn) -> bytes:
    header, body = split(payload)
    body = fn(header, bytearray(body))
    return resign(header, bytes(body))


def set_w(d: list, **kw) -> None:
    for t in d:
        if t["name"] == "w":
            t.update(kw)


def nan_values(h: dict, body: bytearray) -> bytearray:
    b0 = h["b/v"]["data_offsets"][0]
    body[b0 : b0 + 4] = struct.pack("<f", float("nan"))
    return body


def neg_scale(h: dict, body: bytearray) -> bytearray:
    b0 = h["w/s"]["data_offsets"][0]
    body[b0 : b0 + 4] = struct.pack("<f", -1.0)
    return body


def huge_scale(h: dict, body: bytearray) -> bytearray:
    """Finite, but q * s overflows to Inf (found by benchmarks/fuzz_wire.py)."""
    b0 = h["w/s"]["data_offsets"][0]
    body[b0 : b0 + 4] = struct.pack("<f", 7.8e37)
    return body


def dup_index(h: dict, body: bytearray) -> bytearray:
    b0 = h["w/i"]["data_offsets"][0]
    body[b0 + 1] = 0  # second gap 0 -> duplicate index
    return body


def shift_offsets(h: dict, body: bytearray) -> bytearray:
    h["b/v"]["data_offsets"][1] += 4
    return body


def trailing(h: dict, body: bytearray) -> bytearray:
    return body + b"\0\0\0\0"


def f64_dtype(h: dict, body: bytearray) -> bytearray:
    h["b/v"]["dtype"] = "F64"
    h["b/v"]["shape"] = [25]
    return body


def extra_entry(h: dict, body: bytearray) -> bytearray:
    h["junk"] = {"dtype": "U8", "shape": [4], "data_offsets": [len(body), len(body) + 4]}
    return body + b"abcd"


ATTACKS = [
    ("short", lambda p: p[:5], "shorter than"),
    ("huge header", lambda p: struct.pack("<Q", 2**62) + p[8:], "header length"),
    ("header past end", lambda p: struct.pack("<Q", len(p)) + p[8:], "past the end"),
    ("not utf8", lambda p: frame("x", b"")[:8] + b"\xff\xfe" + b" " * 1, "UTF-8"),
    ("not json", lambda p: struct.pack("<Q", 3) + b"{x}", "JSON"),
    ("json array", lambda p: frame([1, 2], b""), "JSON object"),
    ("dup keys", lambda p: struct.pack("<Q", 13) + b'{"a":1,"a":2}', "duplicate"),
    ("bad metadata", lambda p: frame({"__metadata__": {"a": 1}}, b""), "strings"),
    ("wrong format", lambda p: frame({"__metadata__": {"format": "x"}}, b""), "not an"),
    ("flipped body byte", lambda p: p[:-3] + bytes([p[-3] ^ 1]) + p[-2:], "sha256"),
    ("truncated body", lambda p: p[:-1], "outside the body|cover"),
    ("nan value", lambda p: mutate_entries(p, nan_values), "NaN"),
    ("negative scale", lambda p: mutate_entries(p, neg_scale), "scales"),
    ("huge scale", lambda p: mutate_entries(p, huge_scale), "FLT_MAX/128"),
    ("duplicate index", lambda p: mutate_entries(p, dup_index), "duplicate"),
    ("overlap", lambda p: mutate_entries(p, shift_offsets), "byte range|outside"),
    ("trailing bytes", lambda p: mutate_entries(p, trailing), "cover"),
    ("dtype F64", lambda p: mutate_entries(p, f64_dtype), "not allowed"),
    ("extra entry", lambda p: mutate_entries(p, extra_entry), "not described|exceed"),
    ("nnz > n", lambda p: mutate_tensors(p, lambda d: set_w(d, nnz=10**9)), "nnz"),
    ("nnz mismatch", lambda p: mutate_tensors(p, lambda d: set_w(d, nnz=3)), "varint|expected"),
    ("bitmap len", lambda p: mutate_tensors(p, lambda d: set_w(d, coding="bitmap")), "bitmap"),
    ("unknown enc", lambda p: mutate_tensors(p, lambda d: set_w(d, enc="zstd")), "unknown"),
    ("wrong shape", lambda p: mutate_tensors(p, lambda d: set_w(d, shape=[50, 40])), "shape"),
    ("extra field", lambda p: mutate_tensors(p, lambda d: set_w(d, evil=1)), "unexpected"),
    ("bad fill", lambda p: mutate_tensors(p, lambda d: set_w(d, fill="maybe")), "fill"),
    ("values dtype", lambda p: mutate_tensors(p, lambda d: set_w(d, values="F64")), "values"),
    ("unknown tensor", lambda p: mutate_tensors(p, lambda d: set_w(d, name="zz")), "schema"),
    ("twice", lambda p: mutate_tensors(p, lambda d: d.append(dict(d[-1]))), "twice|longer"),
    ("not a list", lambda p: mutate_tensors(p, lambda d: d.clear() or d.append(7)), "object"),
]


@pytest.mark.parametrize(("label", "attack", "reason"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_malicious_payload_rejected_with_reason(label: str, attack, reason: str) -> None:
    bad = attack(valid())
    with pytest.raises(CodecError, match=reason) as info:
        decode_update(bad, SCHEMA, accept_v1=True)
    assert info.value.reason


def test_bad_meta_in_signed_payload() -> None:
    header, body = split(valid())
    header["__metadata__"]["meta"] = json.dumps({"round": -5})
    with pytest.raises(CodecError, match="meta"):
        decode_update(resign(header, body), SCHEMA, accept_v1=True)


def test_int8_dense_block_mismatch() -> None:
    p = mutate_tensors(valid("int8:block=64"), lambda d: set_w(d, block=32))
    with pytest.raises(CodecError, match="expected F32"):
        decode_update(p, SCHEMA, accept_v1=True)
    p = mutate_tensors(valid("int8:block=64"), lambda d: set_w(d, block=0))
    with pytest.raises(CodecError, match="block"):
        decode_update(p, SCHEMA, accept_v1=True)


def test_every_truncation_is_rejected() -> None:
    p = valid()
    for cut in range(len(p)):
        with pytest.raises(CodecError):
            decode_update(p[:cut], SCHEMA, accept_v1=True)


def test_v1_is_retired_unless_asked_for() -> None:
    """Devices (and every default caller) read v2 only, with one line saying why; the
    coordinator's intake opts in for stored pre-v2 outboxes."""
    p = valid()
    with pytest.raises(CodecError, match=r"not a v2 update payload: .* v1 is retired"):
        decode_update(p, SCHEMA)
    check_decoded(decode_update(p, SCHEMA, accept_v1=True))


def test_non_bytes_rejected() -> None:
    with pytest.raises(CodecError, match="bytes"):
        decode_update("hello", SCHEMA, accept_v1=True)  # type: ignore[arg-type]


# ------------------------------------------------------------------ properties

SPECS = st.sampled_from(
    ["none", "fp16", "int8", "int8:channel", "int8:block=7", "int4:block=16", "topk:0.1",
     "topk:0.01+int8", "topk:0.3+fp16", "topk:1+int8"]
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=SPECS,
    rows=st.integers(1, 30),
    cols=st.integers(1, 40),
    scale=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_error_bounds(spec: str, rows: int, cols: int, scale: float, seed: int) -> None:
    schema = ModelSchema({"w": (rows, cols)})
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    u = decode_update(encode_update({"w": x}, META, f"{spec}; min_elements=0"), schema)
    y = u.to_dense()["w"]
    amax = float(np.abs(x).max())
    err = np.abs(y - x)
    if spec == "none":
        assert np.array_equal(x, y)
    elif spec.startswith("int8") or spec == "topk:1+int8":
        assert err.max() <= amax / 254 * 1.0001 + 1e-12
    elif spec.startswith("int4"):
        assert err.max() <= amax / 14 * 1.0001 + 1e-12
    elif spec == "fp16":
        assert np.all(err <= np.abs(x) * 2**-11 + 6e-8)
    else:  # top-k: kept entries within value precision, dropped ones are the smallest
        kept = y != 0
        if kept.any() and (~kept).any():
            assert np.abs(x[~kept]).max() <= np.abs(x[kept]).max()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=SPECS,
    data=st.data(),
)
def test_mutated_bytes_raise_codec_error_or_decode_validly(spec: str, data) -> None:
    p = bytearray(valid(spec, seed=data.draw(st.integers(0, 3))))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice", "resigned"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(p) - 1))
            p[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        p = p[: data.draw(st.integers(0, len(p)))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(p)))
        p[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "splice":
        i = data.draw(st.integers(0, len(p)))
        p = p[:i] + bytearray(data.draw(st.binary(max_size=64)))
    else:  # body mutation with a recomputed digest: exercises the per-tensor checks
        header, body = split(bytes(p))
        body = bytearray(body)
        for _ in range(data.draw(st.integers(1, 6))):
            if body:
                i = data.draw(st.integers(0, len(body) - 1))
                body[i] = data.draw(st.integers(0, 255))
        p = bytearray(resign(header, bytes(body)))
    try:
        u = decode_update(bytes(p), SCHEMA, accept_v1=True)
    except CodecError as e:
        assert e.reason
        return
    check_decoded(u)
