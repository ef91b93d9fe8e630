"""Ed25519 signing of bundles with PyNaCl.

Why PyNaCl (not cryptography): it is already a base dependency (devices install it
anyway), wraps libsodium whose Ed25519 verify is constant-time and rejects
non-canonical signatures, and its API has no algorithm knobs to get wrong. Adding
`cryptography` would be a second native dependency on every device for the same job.

What is signed: ``DOMAIN + manifest.json bytes``. The manifest carries the sha256 of
every other member, so one signature covers the whole bundle; the domain prefix keeps
a bundle signature from being valid for any other message signed with the same key.

Key files are hex text: the private file holds the 32-byte seed (mode 0600), the
public file the 32-byte verify key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from edgefed.bundle.format import BundleError

DOMAIN = b"edgefed-bundle-v1\n"
ALG = "ed25519"


def key_id(verify_key: VerifyKey) -> str:
    """Short fingerprint shown by inspect/verify; not used for trust decisions."""
    return hashlib.sha256(bytes(verify_key)).hexdigest()[:16]


def generate_keypair() -> tuple[SigningKey, VerifyKey]:
    sk = SigningKey.generate()
    return sk, sk.verify_key


def _parse_hex32(text: str, what: str) -> bytes:
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise BundleError(f"{what} is not hex text") from None
    if len(raw) != 32:
        raise BundleError(f"{what} must be 32 bytes (64 hex digits), got {len(raw)}")
    return raw


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read private key {path}: {e}") from None
    return SigningKey(_parse_hex32(text, f"private key {path}"))


def load_verify_key(key: str | os.PathLike[str] | bytes | VerifyKey) -> VerifyKey:
    """Accept a VerifyKey, 32 raw bytes, a path to a .pub file, or the hex text itself."""
    if isinstance(key, VerifyKey):
        return key
    if isinstance(key, bytes):
        if len(key) != 32:
            raise BundleError(f"public key must be 32 bytes, got {len(key)}")
        return VerifyKey(key)
    p = Path(key)
    if p.is_file():
        try:
            return VerifyKey(_parse_hex32(p.read_text(), f"public key {p}"))
        except (OSError, UnicodeDecodeError) as e:
            raise BundleError(f"cannot read public key {p}: {e}") from None
    text = str(key).strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):  # not the hex text itself: a key file
        if p.exists():
            raise BundleError(f"public key {p} is not a regular file")
        raise BundleError(
            f"public key file {p.resolve()} does not exist (expected a .pub file written "
            "by `edgefed keygen`, or the key's 64 hex digits)"
        )
    return VerifyKey(_parse_hex32(text, "public key"))


def write_keypair(private_path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``private_path`` (0600) and ``private_path + '.pub'``; return the public path."""
    priv = Path(private_path)
    pub = priv.with_name(priv.name + ".pub")
    if not overwrite and (priv.exists() or pub.exists()):
        raise BundleError(f"{priv} or {pub} already exists (use --force to overwrite)")
    priv.parent.mkdir(parents=True, exist_ok=True)  # `keygen keys/fleet.key` in a new folder
    sk, vk = generate_keypair()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(priv, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(sk).hex() + "\n")
    os.chmod(priv, 0o600)
    pub.write_text(bytes(vk).hex() + "\n")
    return pub


def sign_manifest(manifest_bytes: bytes, signing_key: SigningKey) -> bytes:
    sig = signing_key.sign(DOMAIN + manifest_bytes).signature
    doc = {
        "alg": ALG,
        "key_id": key_id(signing_key.verify_key),
        "signature": base64.b64encode(sig).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode()


def parse_signature(signature_bytes: bytes) -> tuple[str, bytes]:
    """Return (key_id, 64-byte signature) or raise BundleError."""
    try:
        doc = json.loads(signature_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError("signature.json is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("alg") != ALG:
        raise BundleError(f"signature.json must be an object with alg {ALG!r}")
    try:
        sig = base64.b64decode(str(doc.get("signature", "")), validate=True)
    except ValueError:
        raise BundleError("signature.json signature is not base64") from None
    if len(sig) != 64:
        raise BundleError(f"Ed25519 signature must be 64 bytes, got {len(sig)}")
    return str(doc.get("key_id", "")), sig


def verify_manifest_signature(
    manifest_bytes: bytes, signature_bytes: bytes | None, verify_key: VerifyKey
) -> None:
    if signature_bytes is None:
        raise BundleError("bundle is unsigned (no signature.json)")
    kid, sig = parse_signature(signature_bytes)
    try:
        verify_key.verify(DOMAIN + manifest_bytes, sig)
    except BadSignatureError:
        expected = key_id(verify_key)
        hint = f"signed by key {kid}, expected {expected}" if kid != expected else "tampered"
        raise BundleError(
            f"bad signature: manifest does not verify with this key ({hint})"
        ) from None
