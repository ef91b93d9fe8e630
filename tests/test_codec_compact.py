"""Compact wire format v2: round trips for every pipeline, one hand-built malicious payload
per decoder check (built byte by byte here, independent of the encoder), and a hypothesis
mutation property with the CRC recomputed so the structural checks are reached."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefed.codec import (
    CodecError,
    DecodedUpdate,
    DecodeLimits,
    ModelSchema,
    SparseTensor,
    UpdateMeta,
    decode_update,
    encode_encoded,
    encode_update,
)
from edgefed.codec.compact import decode_compact

SCHEMA = ModelSchema({"w": (40, 50), "b": (50,)})
META = UpdateMeta(round=1, device_id="d", num_samples=5, model_version="v1", kind="delta")
PIPELINES = [
    "none", "fp16", "int8", "int8:channel", "int8:block=7", "int4", "int4:block=16",
    "topk:0.1", "topk:0.01+int8", "topk:0.3+fp16", "topk:1+int8", "topk:0.5+int8",
]  # fmt: skip


def update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SCHEMA.items()}


@pytest.mark.parametrize("spec", PIPELINES)
@pytest.mark.parametrize("small", ["", "; small=none", "; small=fp16", "; min_elements=0"])
def test_round_trip_equals_v1_and_is_smaller(spec: str, small: str) -> None:
    upd = update(3)
    p2 = encode_update(upd, META, spec + small)
    p1 = encode_update(upd, META, spec + small, version=1)
    assert p2[:4] == b"EFU\x02" and p2 == encode_update(upd, META, spec + small)  # deterministic
    assert len(p2) < len(p1)
    d2, d1 = decode_update(p2, SCHEMA), decode_update(p1, SCHEMA, accept_v1=True)
    assert d2.meta == META == d1.meta and d2.nbytes == len(p2)
    for k in SCHEMA:
        np.testing.assert_array_equal(d2.to_dense()[k], d1.to_dense()[k])
        assert type(d2.tensors[k]) is type(d1.tensors[k])


def test_weights_kind_partial_absent_fill_and_memoryview() -> None:
    meta = UpdateMeta(2**53 - 1, "x" * 128, 0, "v" * 128, "weights")
    dec = decode_update(memoryview(encode_update(update(), meta, "int8")), SCHEMA)
    assert dec.meta == meta
    part = SparseTensor((40, 50), np.array([0, 7, 1999], np.uint32), np.ones(3, np.float32),
                        fill="absent")  # fmt: skip
    dec = decode_update(encode_encoded({"w": part}, META), SCHEMA)
    assert set(dec.tensors) == {"w"} and dec.tensors["w"].fill == "absent"
    np.testing.assert_array_equal(dec.tensors["w"].indices, [0, 7, 1999])


def test_front_coded_names_with_long_shared_prefixes() -> None:
    names = [f"encoder.layers.{i}.attention.weight" for i in range(12)]
    schema = ModelSchema({n: (3,) for n in names})
    upd = {n: np.full(3, i, np.float32) for i, n in enumerate(names)}
    p = encode_update(upd, META, "none")
    assert len(p) < sum(map(len, names)) + 12 * 12  # names travel as suffixes after the prefix
    assert decode_update(p, schema).to_dense()["encoder.layers.11.attention.weight"][0] == 11


# ------------------------------------------------------------------ hand-built payloads


def uv(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def layout(shapes: dict[str, tuple[int, ...]]) -> bytes:
    h = hashlib.sha256()
    for k in sorted(shapes):
        h.update(f"{k}:{','.join(map(str, shapes[k]))}\n".encode())
    return h.digest()[:4]


class B:
    """Byte-level payload builder: each field can be replaced to break one check."""

    def __init__(self) -> None:
        self.b = bytearray()

    def raw(self, x: bytes) -> B:
        self.b += x
        return self

    def arr(self, a: np.ndarray, pad: bytes | None = None) -> B:
        n = -len(self.b) % a.dtype.itemsize
        self.b += pad if pad is not None else b"\0" * n
        self.b += a.tobytes()
        return self

    def seal(self) -> bytes:
        return bytes(self.b) + struct.pack("<I", zlib.crc32(self.b))


def head(
    flags: bytes = b"\0",
    rnd: bytes = uv(1),
    dev: bytes = b"\x01d",
    count: bytes = uv(2),
    lay: bytes | None = None,
) -> B:
    lay = layout(dict(SCHEMA)) if lay is None else lay
    return B().raw(b"EFU\x02" + flags + rnd + uv(5) + dev + b"\x02v1" + count + lay)


B32 = np.linspace(-1, 1, 50, dtype=np.float32)


def with_b(bld: B) -> B:  # tensor "b": dense float32
    return bld.raw(b"\x00\x01b\x00").arr(B32)


def sparse_w(
    flags: int = 2, nnz: int = 3, ilen: bytes | None = None, idx: bytes = b"\x00\x07\x05",
    scale: float = 0.5, vals: np.ndarray | None = None,
) -> bytes:  # fmt: skip
    """Tensor "w" as the suffix after "b": sparse int8 (flags 2), varint indices 0, 7, 12."""
    bld = B().raw(b"\x00\x01w\x04" + bytes([flags]) + uv(nnz))
    bld.raw(uv(len(idx)) if ilen is None else ilen).raw(idx)
    return bytes(bld.b), scale, (np.array([1, -2, 3], np.int8) if vals is None else vals)


def good(**kw) -> bytes:
    bld = with_b(head())
    w, scale, vals = sparse_w(**kw)
    bld.raw(w)
    if kw.get("flags", 2) & 3 == 2:  # int8 values carry one scale
        bld.arr(np.array([scale], np.float32))
    bld.arr(vals)
    return bld.seal()


def test_hand_built_valid_payload_decodes() -> None:
    u = decode_update(good(), SCHEMA)
    np.testing.assert_array_equal(u.to_dense()["b"], B32)
    w = u.to_dense()["w"].reshape(-1)
    assert w[0] == 0.5 and w[7] == -1.0 and w[12] == 1.5 and np.count_nonzero(w) == 3


def dense_w(enc: int, body: list[tuple[np.ndarray, bytes | None]], block: bytes = b"") -> bytes:
    bld = with_b(head()).raw(b"\x00\x01w" + bytes([enc]) + block)
    for a, pad in body:
        bld.arr(a, pad)
    return bld.seal()


def flip_last_body_byte(p: bytes) -> bytes:
    return p[:-5] + bytes([p[-5] ^ 1]) + p[-4:]


N = 2000
ATTACKS = [
    ("too short", lambda: b"EFU\x02\0\0", "shorter than magic"),
    ("crc", lambda: flip_last_body_byte(good()), "crc32"),
    ("reserved flags", lambda: with_b(head(flags=b"\x02")).seal(), "reserved flag"),
    ("truncated varint", lambda: B().raw(b"EFU\x02\0\x80").seal(), "truncated"),
    ("overlong varint", lambda: head(rnd=b"\xff" * 11).seal(), "longer than 10"),
    ("non-minimal varint", lambda: head(rnd=b"\x81\x00").seal(), "minimal"),
    ("round too big", lambda: head(rnd=uv(2**53)).seal(), "meta.round"),
    ("device id too long", lambda: head(dev=uv(129) + b"d" * 129).seal(), "device_id length"),
    ("device id binary", lambda: head(dev=b"\x02d\n").seal(), "printable"),
    ("device id past end", lambda: head(dev=uv(100) + b"d").seal(), "truncated"),
    ("too many tensors", lambda: head(count=uv(3)).seal(), "tensor count"),
    (
        "layout truncated",
        lambda: B().raw(b"EFU\x02\0\x01\x05\x01d\x02v1\x02ab").seal(),
        "layout hash",
    ),
    ("prefix too long", lambda: head().raw(b"\x01\x01b").seal(), "prefix length"),
    ("name too long", lambda: head().raw(b"\x00" + uv(201) + b"b" * 201).seal(), "suffix length"),
    ("unknown tensor", lambda: head().raw(b"\x00\x01q\x00").seal(), "not in the model schema"),
    ("twice", lambda: with_b(with_b(head())).seal(), "strictly increasing"),
    ("unknown encoding", lambda: head().raw(b"\x00\x01b\x09").seal(), "unknown encoding"),
    ("truncated values", lambda: head().raw(b"\x00\x01b\x00").arr(B32[:49]).seal(), "truncated"),
    ("padding", lambda: head().raw(b"\x00\x01b\x00").arr(B32, b"\x01\x00").seal(), "padding"),
    (
        "nan f32",
        lambda: head().raw(b"\x00\x01b\x00").arr(np.full(50, np.nan, np.float32)).seal(),
        "NaN",
    ),
    ("inf f16", lambda: dense_w(1, [(np.full(N, np.inf, np.float16), None)]), "NaN or Inf"),
    ("block 0", lambda: dense_w(2, [], uv(0)), "block must be >= 1"),
    ("block > n", lambda: dense_w(2, [], uv(N + 1)), "block"),
    ("scales short", lambda: dense_w(2, [(np.ones(3, np.float32), None)], uv(1000)), "truncated"),
    (
        "negative scale",
        lambda: dense_w(
            2, [(np.array([-1, 1], np.float32), None), (np.zeros(N, np.int8), None)], uv(1000)
        ),
        "scales",
    ),
    (
        "nan scale",
        lambda: dense_w(
            3, [(np.array([np.nan], np.float32), None), (np.zeros(N // 2, np.uint8), None)], uv(N)
        ),
        "scales",
    ),
    (
        "int4 short",
        lambda: dense_w(
            3, [(np.ones(1, np.float32), None), (np.zeros(N // 2 - 1, np.uint8), None)], uv(N)
        ),
        "truncated",
    ),
    ("sparse flags reserved", lambda: good(flags=0x12), "sparse flags"),
    ("sparse values kind 3", lambda: good(flags=0x03), "sparse flags"),
    ("nnz > n", lambda: good(nnz=N + 1), "nnz"),
    ("index bytes > 5 nnz", lambda: good(ilen=uv(16)), "index bytes"),
    ("index bytes < nnz", lambda: good(ilen=uv(2), idx=b"\x00\x07"), "cannot hold"),
    ("zero gap", lambda: good(idx=b"\x00\x07\x00"), "increasing|duplicate|gap|index"),
    ("index out of range", lambda: good(idx=b"\x00\x07\xff\x7f"), "range|index"),
    ("nnz mismatch", lambda: good(nnz=2), "index|varint|bytes|nnz|trailing"),
    (
        "bitmap popcount",
        lambda: good(flags=0x06, ilen=b"", idx=b"\x01" + b"\0" * 249),
        "popcount|bits|nnz|bitmap|index",
    ),
    ("sparse negative scale", lambda: good(scale=-0.5), "scales"),
    ("sparse huge scale", lambda: good(scale=1e37), "FLT_MAX/128"),  # q * s would be Inf
    (
        "int8 huge scale",
        lambda: dense_w(
            2, [(np.array([1e37, 1], np.float32), None), (np.zeros(N, np.int8), None)], uv(1000)
        ),
        "FLT_MAX/128",
    ),
    ("sparse nan f32", lambda: good(flags=0x00, vals=np.array([1, np.nan, 2], np.float32)), "NaN"),
    ("sparse values short", lambda: good(vals=np.array([1, 2], np.int8)), "truncated"),
    ("trailing bytes", lambda: with_b(head(count=uv(1))).raw(b"\0").seal(), "trailing bytes"),
    ("layout mismatch", lambda: with_b(head(count=uv(1), lay=b"\0\0\0\0")).seal(), "layout hash"),
]


@pytest.mark.parametrize(("label", "build", "reason"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_malicious_payload_rejected_with_reason(label: str, build, reason: str) -> None:
    with pytest.raises(CodecError, match=reason) as info:
        decode_update(build(), SCHEMA)
    assert info.value.reason


def test_limits_and_dispatch() -> None:
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode_update(good(), SCHEMA, DecodeLimits(max_bytes=100))
    with pytest.raises(CodecError, match="bad magic"):
        decode_compact(b"EFU\x03" + good()[4:], SCHEMA, DecodeLimits())
    with pytest.raises(CodecError):  # another version's magic is not taken for v1 either
        decode_update(b"EFU\x03" + good()[4:], SCHEMA)
    with pytest.raises(CodecError, match="tensor count"):
        decode_update(good(), SCHEMA, DecodeLimits(max_tensors=1))


def test_every_truncation_is_rejected() -> None:
    p = encode_update(update(), META, "topk:0.05+int8")
    for cut in range(len(p)):
        with pytest.raises(CodecError):
            decode_update(p[:cut], SCHEMA)


# ------------------------------------------------------------------ mutation property


def check_decoded(u: DecodedUpdate) -> None:
    for name, arr in u.to_dense().items():
        assert arr.shape == SCHEMA[name] and arr.dtype == np.float32
        assert np.isfinite(arr).all()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.sampled_from(PIPELINES), data=st.data())
def test_mutated_bytes_raise_codec_error_or_decode_validly(spec: str, data) -> None:
    seed = data.draw(st.integers(0, 3))
    p = bytearray(encode_update(update(seed), META, f"{spec}; min_elements=100"))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
    body = p[:-4]
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        body = body[: data.draw(st.integers(0, len(body)))]
    elif kind == "insert":
        i = data.draw(st.integers(0, len(body)))
        body[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        i = data.draw(st.integers(0, len(body)))
        body = body[:i] + bytearray(data.draw(st.binary(max_size=64)))
    resealed = data.draw(st.booleans())  # a fresh CRC reaches the structural checks
    tail = struct.pack("<I", zlib.crc32(body)) if resealed else bytes(p[-4:])
    try:
        u = decode_update(bytes(body) + tail, SCHEMA)
    except CodecError as e:
        assert e.reason
        return
    check_decoded(u)
