"""Signed downlink: an Ed25519 envelope around global weights, tasks and bundles (torch-free).

TLS protects a hop; it does not tell a device that the *coordinator* produced a model (anyone
with broker write access to a downlink topic -- a compromised coordinator account, a broker
misconfiguration, a bridge -- could publish one). So the coordinator signs every downlink
payload with an offline-generated Ed25519 key, and the agent checks it before using a byte.

Wire format (little-endian, fixed 85-byte header, then the payload)::

    magic   4  b"EFSG"
    version 1  1
    key_id  8  first 8 bytes of SHA-256(verify key): picks the key, allows rotation
    seq     8  u64, the round (or any counter that only grows): anti-replay
    sig    64  Ed25519 over DOMAIN | u16 len(context) | context | magic..seq | payload

``context`` is supplied by both sides and never sent: e.g. ``downlink_context(topic)``. A
signature made for one topic (or purpose) therefore never verifies on another, and one made for
round 3 never verifies when the receiver expects round 5 (``expected_seq`` / ``min_seq``).
Every failure raises :class:`EnvelopeError` with a ``reason`` naming the check that failed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

MAGIC = b"EFSG"
VERSION = 1
DOMAIN = b"edgefed-signed-envelope-v1\0"
_HEAD = struct.Struct("<4sB8sQ")  # magic, version, key_id, seq
SIG_LEN = 64
HEADER_LEN = _HEAD.size + SIG_LEN  # 85
MAX_CONTEXT = 4096
MAX_SEQ = 2**64 - 1

VerifyKeys = VerifyKey | bytes | Iterable[VerifyKey | bytes] | Mapping[bytes, VerifyKey]


class EnvelopeError(ValueError):
    """A signed payload was rejected; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"signed payload rejected: {reason}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Opened:
    """A verified payload with the header fields that were signed with it."""

    payload: bytes
    key_id: bytes
    seq: int


def downlink_context(topic: str, purpose: str = "downlink") -> bytes:
    """The context for a payload published on ``topic`` (purpose separates e.g. bundles)."""
    return b"edgefed-" + purpose.encode() + b"-v1\0" + topic.encode()


def key_id(key: VerifyKey | SigningKey | bytes) -> bytes:
    """8-byte id of a public key (a SigningKey is reduced to its verify key)."""
    if isinstance(key, SigningKey):
        key = key.verify_key
    raw = bytes(key)
    if len(raw) != 32:
        raise EnvelopeError("bad_key", f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return hashlib.sha256(raw).digest()[:8]


def _signed_message(context: bytes, head: bytes, payload: bytes) -> bytes:
    if len(context) > MAX_CONTEXT:
        raise EnvelopeError("bad_context", f"context is {len(context)} bytes, max {MAX_CONTEXT}")
    return b"".join((DOMAIN, struct.pack("<H", len(context)), context, head, payload))


def _signing_key(key: SigningKey | bytes) -> SigningKey:
    if isinstance(key, SigningKey):
        return key
    if isinstance(key, bytes | bytearray) and len(key) == 32:
        return SigningKey(bytes(key))
    raise EnvelopeError("bad_key", "signing key must be a nacl SigningKey or a 32-byte seed")


def sign_payload(
    payload: bytes, signing_key: SigningKey | bytes, *, context: bytes, seq: int = 0
) -> bytes:
    """Wrap ``payload`` in a signed envelope bound to ``context`` and sequence ``seq``."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EnvelopeError("bad_payload", f"payload must be bytes, got {type(payload).__name__}")
    if not 0 <= seq <= MAX_SEQ:
        raise EnvelopeError("bad_seq", f"seq must fit in u64, got {seq}")
    sk = _signing_key(signing_key)
    head = _HEAD.pack(MAGIC, VERSION, key_id(sk), seq)
    sig = sk.sign(_signed_message(context, head, bytes(payload))).signature
    return b"".join((head, sig, bytes(payload)))


def _keyring(keys: VerifyKeys) -> dict[bytes, VerifyKey]:
    if isinstance(keys, Mapping):
        return dict(keys)
    if isinstance(keys, VerifyKey | bytes | bytearray):
        keys = [keys]
    ring: dict[bytes, VerifyKey] = {}
    for k in keys:
        if not isinstance(k, VerifyKey) and len(bytes(k)) != 32:
            raise EnvelopeError("bad_key", f"an Ed25519 public key is 32 bytes, got {len(k)}")
        vk = k if isinstance(k, VerifyKey) else VerifyKey(bytes(k))
        ring[key_id(vk)] = vk
    if not ring:
        raise EnvelopeError("no_keys", "no verify key configured")
    return ring


def open_envelope(
    signed: bytes,
    verify_keys: VerifyKeys,
    *,
    context: bytes,
    expected_seq: int | None = None,
    min_seq: int | None = None,
) -> Opened:
    """Verify ``signed`` and return its payload with the signed key id and sequence.

    ``expected_seq``: the exact round the receiver waits for; ``min_seq``: reject anything
    older (e.g. last accepted + 1). Checks run cheapest first; nothing is trusted before the
    signature verifies except the fixed-size header used to find the key.
    """
    if not isinstance(signed, bytes | bytearray | memoryview):
        raise EnvelopeError("bad_type", f"expected bytes, got {type(signed).__name__}")
    signed = bytes(signed)
    if len(signed) < HEADER_LEN:
        raise EnvelopeError("truncated", f"{len(signed)} bytes, header alone is {HEADER_LEN}")
    magic, version, kid, seq = _HEAD.unpack_from(signed)
    if magic != MAGIC:
        raise EnvelopeError("bad_magic", f"got {magic!r}")
    if version != VERSION:
        raise EnvelopeError("bad_version", f"got {version}, this build reads {VERSION}")
    vk = _keyring(verify_keys).get(kid)
    if vk is None:
        raise EnvelopeError("unknown_key", f"key id {kid.hex()} is not trusted")
    head, sig, payload = signed[: _HEAD.size], signed[_HEAD.size : HEADER_LEN], signed[HEADER_LEN:]
    try:
        vk.verify(_signed_message(context, head, payload), sig)
    except BadSignatureError:
        raise EnvelopeError(
            "bad_signature", "tampered, truncated, or signed for another context"
        ) from None
    if expected_seq is not None and seq != expected_seq:
        raise EnvelopeError("wrong_seq", f"signed for sequence {seq}, expected {expected_seq}")
    if min_seq is not None and seq < min_seq:
        raise EnvelopeError("replayed", f"sequence {seq} is older than {min_seq}")
    return Opened(payload, kid, seq)


def open_payload(
    signed: bytes,
    verify_key: VerifyKeys,
    *,
    context: bytes,
    expected_seq: int | None = None,
    min_seq: int | None = None,
) -> bytes:
    """Like :func:`open_envelope`, returning only the verified payload bytes."""
    return open_envelope(
        signed, verify_key, context=context, expected_seq=expected_seq, min_seq=min_seq
    ).payload
