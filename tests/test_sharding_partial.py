"""The partial-aggregate format (hostile input), the merge's exactly-once accounting and
the sharding configs, without a broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefed.codec import (
    Accumulator,
    CodecError,
    ModelSchema,
    SparseTensor,
    UpdateMeta,
    decode_update,
    encode_encoded,
    encode_update,
)
from edgefed.codec.container import write_container
from edgefed.sharding import PartialMerger, ShardingConfig, WorkerConfig
from edgefed.sharding.partial import Partial, _digest, decode_partial, encode_partial

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ModelSchema({"w": (64, 32), "b": (64,), "h": (8, 4)})


def updates(n: int, seed: int = 0, rnd: int = 3):
    """Compressed updates incl. head-only ones and one partial at coordinate level."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        names = ("h",) if i % 4 == 3 else tuple(SCHEMA)
        t = {k: rng.standard_normal(SCHEMA[k]).astype(np.float32) for k in names}
        meta = UpdateMeta(rnd, f"d{i}", int(rng.integers(1, 50)), "v", kind="delta")
        if i % 5 == 4:  # coordinate-level partial update: per-coordinate weights
            idx = np.sort(rng.choice(2048, 100, replace=False)).astype(np.uint32)
            enc = {"w": SparseTensor((64, 32), idx, rng.standard_normal(100).astype(np.float32),
                                     fill="absent")}  # fmt: skip
            out.append(decode_update(encode_encoded(enc, meta), SCHEMA))
        else:
            out.append(decode_update(encode_update(t, meta, "topk:0.1+int8"), SCHEMA))
    return out


def partial_of(ups, worker: str, instance: str = "i1", rnd: int = 3) -> Partial:
    acc = Accumulator(SCHEMA)
    for u in ups:
        acc.add(u, float(u.meta.num_samples))
    s, w = acc.result()
    keys = [(u.meta.device_id, rnd, f"u-{u.meta.device_id}") for u in ups]
    return Partial(
        rnd, worker, instance, SCHEMA.digest(), keys,
        float(sum(u.meta.num_samples for u in ups)), 0, 0,
        {k: v.ravel() for k, v in s.items()}, {k: v.ravel() for k, v in w.items()},
    )  # fmt: skip


def test_round_trip_compacts_uniform_weights():
    ups = updates(10)
    p = partial_of(ups, "a")
    q = decode_partial(encode_partial(p), SCHEMA)
    assert q.keys == p.keys and q.round == 3 and q.weight_total == p.weight_total
    assert q.weights["b"].shape == (1,)  # uniform: one number on the wire
    assert q.weights["w"].shape == (2048,)  # coordinate-level partial update present
    for k in SCHEMA:
        np.testing.assert_array_equal(q.sums[k], p.sums[k])
        np.testing.assert_array_equal(np.broadcast_to(q.weights[k], p.weights[k].shape),
                                      p.weights[k])  # fmt: skip
    empty = Partial(3, "a", "i1", SCHEMA.digest())
    e = decode_partial(encode_partial(empty), SCHEMA)
    assert e.count == 0 and e.sums == {}


def forge(meta: dict, arrays: list[tuple[str, np.ndarray]] | None = None, md: dict | None = None):
    """A partial with a VALID digest over whatever we put in, so the later checks are hit."""
    meta_json = json.dumps(meta)
    base = {"format": "edgefed.partial", "version": "1", "meta": meta_json}
    if md is not None:
        base.update(md)

    def fin(body):
        return {**base, "sha256": _digest(meta_json, body)}

    return write_container(arrays or [], base, fin)


def good_meta(**kw) -> dict:
    m = {"round": 3, "worker": "a", "instance": "i1", "amendment": 0,
         "schema_digest": SCHEMA.digest(), "keys": [["d1", 3, "u1"]], "weight_total": 5.0,
         "rejected": 0}  # fmt: skip
    m.update(kw)
    return m


def good_arrays(**over) -> list[tuple[str, np.ndarray]]:
    arrs = {}
    for n in SCHEMA:
        arrs[f"{n}/s"] = np.ones(SCHEMA.size(n), np.float32)
        arrs[f"{n}/w"] = np.array([5.0], np.float32)
    arrs.update(over)
    return [(k, v) for k, v in arrs.items() if v is not None]


def test_forge_helper_builds_a_valid_partial():
    p = decode_partial(forge(good_meta(), good_arrays()), SCHEMA)
    assert p.keys == [("d1", 3, "u1")]


BAD = {
    "not a partial": (lambda: forge(good_meta(), good_arrays(), {"format": "edgefed.update"}),
                      "not an edgefed.partial"),
    "extra metadata": (lambda: forge(good_meta(), good_arrays(), {"x": "1"}), "exactly format"),
    "meta missing key": (lambda: forge({k: v for k, v in good_meta().items() if k != "rejected"},
                                       good_arrays()), "exactly the keys"),
    "round not int": (lambda: forge(good_meta(round="3"), good_arrays()), "meta.round"),
    "negative amendment": (lambda: forge(good_meta(amendment=-1), good_arrays()), "amendment"),
    "bool round": (lambda: forge(good_meta(round=True), good_arrays()), "meta.round"),
    "bad worker id": (lambda: forge(good_meta(worker="a/#"), good_arrays()), "meta.worker"),
    "other model": (lambda: forge(good_meta(schema_digest="0" * 64), good_arrays()),
                    "another model layout"),
    "weight_total NaN": (lambda: forge(good_meta(weight_total=float("nan")), good_arrays()),
                         "weight_total must be a finite number"),
    "weight_total negative": (lambda: forge(good_meta(weight_total=-1), good_arrays()),
                              "weight_total"),
    "key of another round": (lambda: forge(good_meta(keys=[["d1", 4, "u1"]]), good_arrays()),
                             "for round 4"),
    "device twice": (lambda: forge(good_meta(keys=[["d1", 3, "u1"], ["d1", 3, "u2"]]),
                                   good_arrays()), "twice"),
    "malformed key": (lambda: forge(good_meta(keys=[["d1", 3]]), good_arrays()),
                      "is not [device"),
    "key with wildcard": (lambda: forge(good_meta(keys=[["d+", 3, "u"]]), good_arrays()),
                          "is not [device"),
    "missing tensor": (lambda: forge(good_meta(), good_arrays(**{"h/s": None})),
                       "do not match the model"),
    "extra entry": (lambda: forge(good_meta(), good_arrays(**{"z/s": np.ones(2, np.float32)})),
                    "7 tensors exceed the limit of 6"),
    "foreign entry": (lambda: forge(good_meta(), good_arrays(**{"h/s": None,
                                                              "z/s": np.ones(2, np.float32)})),
                      "do not match the model"),
    "entries in an empty partial": (lambda: forge(good_meta(keys=[]), good_arrays()),
                                    "do not match the model"),
    "f16 sums": (lambda: forge(good_meta(), good_arrays(**{"b/s": np.ones(64, np.float16)})),
                 "sums must be F32"),
    "short sums": (lambda: forge(good_meta(), good_arrays(**{"b/s": np.ones(63, np.float32)})),
                   "sums must be F32"),
    "weights of wrong length": (
        lambda: forge(good_meta(), good_arrays(**{"b/w": np.ones(2, np.float32)})),
        "weights must be F32"),
    "NaN sums": (lambda: forge(good_meta(), good_arrays(**{"b/s": np.full(64, np.nan,
                                                                          np.float32)})), "NaN"),
    "negative weights": (lambda: forge(good_meta(), good_arrays(**{"b/w": np.array([-1.0],
                                                                   np.float32)})), "weights"),
    "weights above weight_total": (
        lambda: forge(good_meta(), good_arrays(**{"b/w": np.array([6.0], np.float32)})),
        "weights must be in [0, weight_total]"),
    "too many keys": (lambda: forge(good_meta(keys=[[f"d{i}", 3, "u"] for i in range(20)]),
                                    good_arrays()), "at most 10 keys"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_partials_rejected_with_reason(case):
    make, reason = BAD[case]
    with pytest.raises(CodecError) as ei:
        decode_partial(make(), SCHEMA, max_keys=10)
    assert reason in ei.value.reason, ei.value.reason


def test_corrupted_truncated_and_oversized_payloads():
    data = encode_partial(partial_of(updates(6), "a"))
    flipped = bytearray(data)
    flipped[-5] ^= 1
    with pytest.raises(CodecError, match="sha256 mismatch"):
        decode_partial(bytes(flipped), SCHEMA)
    for cut in (0, 7, 20, len(data) - 1):
        with pytest.raises(CodecError):
            decode_partial(data[:cut], SCHEMA)
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode_partial(data + b"\0" * (1 << 20), SCHEMA, max_keys=10)
    huge_header = (1 << 40).to_bytes(8, "little") + b"{}"
    with pytest.raises(CodecError, match="header length"):
        decode_partial(huge_header, SCHEMA)
    with pytest.raises(CodecError, match="must be bytes"):
        decode_partial("text", SCHEMA)  # type: ignore[arg-type]


def test_merge_equals_one_accumulator_and_resolves_duplicates():
    ups = updates(40, seed=1)
    ref = Accumulator(SCHEMA)
    for u in ups:
        ref.add(u, float(u.meta.num_samples))
    ref_s, ref_w = ref.result()
    shards = {"a": ups[0:15], "b": ups[15:28], "c": ups[28:]}
    # worker c also got copies of d0 and d20 (a device re-sent its update)
    shards_dup = {**shards, "c": [*shards["c"], ups[0], ups[20]]}
    m = PartialMerger(SCHEMA, 3)
    for w in shards_dup:
        m.set_live(w, "i1")
        assert m.add(w, encode_partial(partial_of(shards_dup[w], w))) is not None
    assert m.conflicts() == {"c": ["d0", "d20"]}
    with pytest.raises(RuntimeError, match="overlap"):
        m.merge()
    amended = partial_of(shards["c"], "c")  # what the worker re-issues without d0, d20
    amended.amendment = 1
    assert m.add("c", encode_partial(amended)) is not None
    assert m.conflicts() == {}
    res = m.merge()
    assert res.count == 40 and len({k[0] for k in res.keys}) == 40
    assert res.per_worker == {"a": 15, "b": 13, "c": 12}
    for k in SCHEMA:
        np.testing.assert_allclose(res.sums[k], ref_s[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res.weights[k], ref_w[k], rtol=1e-6)
    np.testing.assert_allclose(res.average()["w"], ref.average()["w"], rtol=1e-4, atol=1e-6)


def test_merge_rejects_fenced_unknown_stale_and_misaddressed_partials():
    ups = updates(6)
    m = PartialMerger(SCHEMA, 3)
    m.set_live("a", "i1")
    m.set_live("b", "i1")
    assert m.add("a", encode_partial(partial_of(ups[:3], "a", "other"))) is None
    assert "unknown worker instance" in m.rejected[-1][1]
    assert m.add("a", encode_partial(partial_of(ups[:3], "b"))) is None
    assert "names worker" in m.rejected[-1][1]
    assert m.add("a", encode_partial(partial_of(ups[:3], "a", rnd=2))) is None
    assert "round 2" in m.rejected[-1][1]
    assert m.add("a", encode_partial(partial_of(ups[:3], "a"))) is not None
    assert m.add("a", encode_partial(partial_of(ups[:3], "a"))) is None  # same amendment
    assert "stale" in m.rejected[-1][1]
    lost = m.declare_dead("a", "test: worker lost")
    assert [k[0] for k in lost] == ["d0", "d1", "d2"]
    assert m.add("a", encode_partial(partial_of(ups[:3], "a"))) is None  # fenced instance
    assert "declared dead" in m.rejected[-1][1]
    # an overlap that is never amended: the later worker's partial is rejected whole
    m.set_live("c", "i1")
    m.add("b", encode_partial(partial_of(ups[3:], "b")))
    m.add("c", encode_partial(partial_of(ups[4:], "c")))
    m.reject_conflicting()
    res = m.merge()
    assert sorted(k[0] for k in res.keys) == ["d3", "d4", "d5"]
    assert set(res.per_worker) == {"b"}


def test_worker_config_rules():
    cfg = WorkerConfig.from_dict({"worker": {"id": "agg-1"}, "transport": {"url": "mqtt://h:1"}})
    assert cfg.transport.session_expiry == 0 and cfg.transport.protocol == "5"
    bad = [
        ({"worker": {}}, "id: expected a string, found nothing"),
        ({"worker": {"id": "a/b"}}, "invalid worker id"),
        ({"worker": {"id": "a", "colour": 1}}, "unknown key"),
        ({"worker": {"id": "a", "heartbeat_interval": True}}, "expected a number"),
        ({"worker": {"id": "a", "heartbeat_interval": 0}}, "heartbeat_interval"),
        (
            {"worker": {"id": "a"}, "transport": {"session_expiry": 60}},
            "session_expiry: expected 0",
        ),
        ({"worker": {"id": "a"}, "transport": {"protocol": "3.1.1"}}, "MQTT 5"),
        ({"worker": {"id": "a"}, "extra": {}}, "unknown section"),
    ]
    for d, msg in bad:
        with pytest.raises(ValueError, match=msg):
            WorkerConfig.from_dict(d)
    assert ShardingConfig.from_dict({"workers": 3, "heartbeat_timeout": 2}).workers == 3
    bad_tables = [
        ({"workers": 0}, "workers"),
        ({"on_worker_loss": "retry"}, "on_worker_loss"),
        ({"workerz": 1}, "unknown key"),
        ({"group": "$share"}, "worker group"),
    ]
    for t, msg in bad_tables:
        with pytest.raises(ValueError, match=msg):
            ShardingConfig.from_dict(t)


def test_cli_reports_a_bad_config(tmp_path):
    conf = tmp_path / "w.toml"
    conf.write_text('[worker]\nid = "a"\n[transport]\nsession_expiry = 5\n')
    r = subprocess.run(
        [sys.executable, "-m", "edgefed", "aggregator", "--config", str(conf)],
        capture_output=True, text=True, env=dict(os.environ),
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{conf}: [transport] session_expiry: expected 0" in r.stderr
