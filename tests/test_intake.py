"""The shared intake (coordinator/intake.py): every check, one hand-built message each.

Messages are built as devices build them (UpdateHeader + codec payload); each bad one must
be dropped with its category (the metric name) and a reason naming what was wrong, and the
good one accepted in its compressed form.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.codec import CompressionSpec, ModelSchema, UpdateMeta, encode_update
from edgefed.coordinator.intake import AcceptedUpdate, RoundContext, accept
from edgefed.protocol import Drop, DropReason, UpdateHeader, pack

SCHEMA = ModelSchema({"body.w": (8, 6), "head.w": (3, 8), "head.b": (3,)})
HEAD = frozenset({"head.w", "head.b"})


def message(
    dev: str = "d0",
    rnd: int = 2,
    uid: str = "u1",
    num: int = 10,
    version: str = "r1",
    tensors: tuple[str, ...] = tuple(SCHEMA),
    meta_num: int | None = None,
    header: dict | None = None,
) -> bytes:
    rng = np.random.default_rng(0)
    delta = {n: rng.standard_normal(SCHEMA[n]).astype(np.float32) for n in tensors}
    meta = UpdateMeta(rnd, dev, num if meta_num is None else meta_num, version, kind="delta")
    payload = encode_update(delta, meta, CompressionSpec.parse("int8"))
    h = UpdateHeader(rnd, dev, uid, num, 0.25).to_dict() if header is None else header
    return pack(h, {"update": payload})


def ctx(**kw) -> RoundContext:
    base = {"round": 2, "model_version": "r1", "schema": SCHEMA,
            "allowed": {"d0": frozenset(SCHEMA), "weak": HEAD}}  # fmt: skip
    return RoundContext(**{**base, **kw})


CASES = [
    ("garbage", "d0", b"\x01\x00", {}, DropReason.INVALID, "header length"),
    ("no num_samples", "d0", pack({"round": 2, "device_id": "d0", "update_id": "u"}), {},
     DropReason.INVALID, "num_samples"),
    ("bad update id", "d0", message(uid="../x"), {}, DropReason.INVALID, "update_id"),
    ("device error", "d0", pack({"round": 2, "device_id": "d0", "update_id": "e",
                                 "error": "missing graph"}), {},
     DropReason.DEVICE_ERROR, "missing graph"),
    ("topic mismatch", "d1", message(), {}, DropReason.INVALID, "!= topic device"),
    ("late", "d0", message(rnd=1), {}, DropReason.LATE, "round 1"),
    ("between rounds", "d0", message(), {"round": None}, DropReason.LATE, "round 2"),
    ("after the close", "d0", message(), {"closed": True}, DropReason.LATE, "round 2"),
    ("future", "d0", message(rnd=3), {}, DropReason.INVALID, "future round 3"),
    ("not sampled", "d9", message(dev="d9"), {}, DropReason.NOT_SAMPLED, ""),
    ("counted before", "d0", message(), {"seen": {("d0", 2, "u1")}}, DropReason.DUPLICATE,
     "already counted"),
    ("second update", "d0", message(uid="u2"), {"answered": {"d0": ("d0", 2, "u1")}},
     DropReason.DUPLICATE, "already answered"),
    ("zero samples", "d0", message(num=0, meta_num=0), {}, DropReason.INVALID, "num_samples"),
    ("no update part", "d0", pack(UpdateHeader(2, "d0", "u1", 10).to_dict()), {},
     DropReason.INVALID, "no update part"),
    ("corrupt payload", "d0", pack(UpdateHeader(2, "d0", "u1", 10).to_dict(),
                                   {"update": b"EFU2" + b"\x00" * 40}), {},
     DropReason.INVALID, ""),
    ("meta disagrees", "d0", message(meta_num=11), {}, DropReason.INVALID, "codec metadata"),
    ("model version", "d0", message(version="r0"), {}, DropReason.INVALID, "model version 'r0'"),
    ("empty update", "d0", message(tensors=()), {}, DropReason.INVALID, "no tensors"),
    ("outside its graph", "weak", message(dev="weak"), {}, DropReason.INVALID,
     "tensors outside its graph: ['body.w']"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "dev", "data", "kw", "reason", "words"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_each_check_drops_with_its_reason(case, dev, data, kw, reason, words) -> None:
    got = accept(dev, data, ctx(**kw))
    assert isinstance(got, Drop), (case, got)
    assert got.reason is reason, got
    assert words in got.text, got.text
    assert got.text.startswith(reason.value)  # the metric category leads the logged line


def test_retry_and_redelivery_flags() -> None:
    assert accept("d0", message(rnd=3), ctx()).retry  # a worker holds it for the announcement
    assert accept("d0", message(), ctx(round=None)).retry
    assert not accept("d0", message(rnd=1), ctx()).retry
    again = accept("d0", message(), ctx(answered={"d0": ("d0", 2, "u1")}))
    assert again.redelivery  # the same key: a QoS 1 copy, not a second update


def test_valid_updates_are_accepted_compressed() -> None:
    full = accept("d0", message(), ctx())
    assert isinstance(full, AcceptedUpdate), full
    assert full.key == ("d0", 2, "u1") and full.num_samples == 10 and full.header.loss == 0.25
    assert set(full.update.tensors) == set(SCHEMA)
    assert type(full.update.tensors["body.w"]).__name__ == "DenseInt8"  # never expanded
    head = accept("weak", message(dev="weak", tensors=tuple(HEAD)), ctx())
    assert isinstance(head, AcceptedUpdate), head
