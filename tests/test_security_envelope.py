"""Signed downlink envelope: every tampering, truncation, key, context or replay is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from edgefed.bundle.signing import load_signing_key, load_verify_key, write_keypair
from edgefed.security.envelope import (
    HEADER_LEN,
    EnvelopeError,
    downlink_context,
    key_id,
    open_envelope,
    open_payload,
    sign_payload,
)
from edgefed.transport.topics import Topics

SK = SigningKey(bytes(range(32)))
VK = SK.verify_key
TOPICS = Topics("farm")
CTX = downlink_context(TOPICS.task("dev-0"))
PAYLOAD = b"global weights for round 7" * 10


def reason(signed: bytes, keys=VK, ctx: bytes = CTX, **kw) -> str:
    with pytest.raises(EnvelopeError) as e:
        open_payload(signed, keys, context=ctx, **kw)
    return e.value.reason


def test_round_trip_returns_payload_key_and_sequence() -> None:
    signed = sign_payload(PAYLOAD, SK, context=CTX, seq=7)
    assert len(signed) == HEADER_LEN + len(PAYLOAD)
    opened = open_envelope(signed, VK, context=CTX, expected_seq=7)
    assert (opened.payload, opened.key_id, opened.seq) == (PAYLOAD, key_id(VK), 7)
    assert open_payload(signed, [VK], context=CTX, min_seq=7) == PAYLOAD
    assert open_payload(sign_payload(b"", SK, context=CTX), VK, context=CTX) == b""


def test_every_flipped_bit_is_detected() -> None:
    signed = sign_payload(b"abc", SK, context=CTX, seq=3)
    for i in range(len(signed)):
        for bit in (0, 7):
            bad = bytearray(signed)
            bad[i] ^= 1 << bit
            r = reason(bytes(bad))
            assert r in ("bad_magic", "bad_version", "unknown_key", "bad_signature"), (i, r)


def test_truncated_and_extended_are_rejected() -> None:
    signed = sign_payload(PAYLOAD, SK, context=CTX)
    assert reason(signed[:10]) == "truncated"
    assert reason(signed[: HEADER_LEN - 1]) == "truncated"
    assert reason(signed[:-1]) == "bad_signature"
    assert reason(signed + b"\0") == "bad_signature"
    assert reason(b"") == "truncated"


def test_wrong_key_and_unknown_key_id() -> None:
    signed = sign_payload(PAYLOAD, SK, context=CTX)
    other = SigningKey.generate()
    assert reason(signed, keys=other.verify_key) == "unknown_key"
    # an attacker re-labels its own signature with the trusted key id: the signature fails
    forged = sign_payload(PAYLOAD, other, context=CTX)
    relabeled = forged[:5] + key_id(VK) + forged[13:]
    assert reason(relabeled) == "bad_signature"
    # key rotation: a keyring with old and new key opens both
    assert open_payload(forged, [VK, other.verify_key], context=CTX) == PAYLOAD


def test_signature_is_bound_to_topic_and_purpose() -> None:
    signed = sign_payload(PAYLOAD, SK, context=CTX)
    assert reason(signed, ctx=downlink_context(TOPICS.task("dev-1"))) == "bad_signature"
    assert reason(signed, ctx=downlink_context(TOPICS.round)) == "bad_signature"
    assert reason(signed, ctx=downlink_context(TOPICS.task("dev-0"), "bundle")) == "bad_signature"
    assert reason(signed, ctx=b"") == "bad_signature"


def test_replayed_round_is_rejected() -> None:
    old = sign_payload(b"round 3 weights", SK, context=CTX, seq=3)
    assert reason(old, expected_seq=5) == "wrong_seq"
    assert reason(old, min_seq=4) == "replayed"
    # the sequence is signed: rewriting it in the header breaks the signature
    bumped = old[:13] + (5).to_bytes(8, "little") + old[21:]
    assert reason(bumped, expected_seq=5) == "bad_signature"


def test_bad_arguments_have_reasons() -> None:
    with pytest.raises(EnvelopeError, match="bad_seq"):
        sign_payload(b"x", SK, context=CTX, seq=-1)
    with pytest.raises(EnvelopeError, match="bad_key"):
        sign_payload(b"x", b"short", context=CTX)
    with pytest.raises(EnvelopeError, match="bad_payload"):
        sign_payload("text", SK, context=CTX)  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="bad_context"):
        sign_payload(b"x", SK, context=b"c" * 5000)
    assert reason(sign_payload(b"x", SK, context=CTX), keys=[]) == "no_keys"
    assert reason(sign_payload(b"x", SK, context=CTX), keys=b"\1" * 31) == "bad_key"
    assert reason("not bytes") == "bad_type"  # type: ignore[arg-type]


def test_keys_from_edgefed_keygen_files(tmp_path) -> None:
    """The bundle key files (``edgefed keygen``) work for the downlink too."""
    pub = write_keypair(tmp_path / "coordinator.key")
    sk = load_signing_key(tmp_path / "coordinator.key")
    signed = sign_payload(PAYLOAD, sk, context=CTX, seq=1)
    assert open_payload(signed, load_verify_key(pub), context=CTX, expected_seq=1) == PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_open(blob: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_payload(blob, VK, context=CTX)


def test_downlink_signer_and_verifier_track_rounds_per_topic() -> None:
    from edgefed.security.downlink import DownlinkSigner, DownlinkVerifier

    signer, verifier = DownlinkSigner(SK), DownlinkVerifier(VK)
    t0, t1 = TOPICS.task("dev-0"), TOPICS.task("dev-1")
    assert verifier.open(t0, signer.sign(t0, b"w3", 3)) == (b"w3", 3)
    assert verifier.open(t0, signer.sign(t0, b"w3", 3)) == (b"w3", 3)  # redelivery is fine
    with pytest.raises(EnvelopeError) as e:
        verifier.open(t0, signer.sign(t0, b"w2", 2))
    assert e.value.reason == "replayed"
    with pytest.raises(EnvelopeError) as e:
        verifier.open(t0, signer.sign(t1, b"w9", 9))  # dev-1's task replayed to dev-0
    assert e.value.reason == "bad_signature"
    bundle_signer = DownlinkSigner(SK, purpose="bundle")
    with pytest.raises(EnvelopeError):
        verifier.open(t0, bundle_signer.sign(t0, b"bundle", 9))
    restarted = DownlinkVerifier([VK])
    restarted.load_state(verifier.state())
    with pytest.raises(EnvelopeError, match="replayed"):
        restarted.open(t0, signer.sign(t0, b"w1", 1))
    assert restarted.open(TOPICS.round, signer.sign(TOPICS.round, b"r1", 1)) == (b"r1", 1)
