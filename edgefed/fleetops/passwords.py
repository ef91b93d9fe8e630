"""mosquitto password files, written in Python (stdlib only).

Decision: hash in Python instead of calling ``mosquitto_passwd -b``, because
* ``-b`` puts each password on a command line, readable by every local user in
  ``/proc/<pid>/cmdline`` while it runs;
* the fleet config is often generated on a machine without mosquitto installed;
* it is one subprocess per device (200 devices = 200 processes) and it is not deterministic
  to test.
The format is mosquitto 2.0's own (``src/password_mosq.c``, ``mosquitto_passwd``):
``user:$7$<iterations>$<base64 12-byte salt>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>``.
Iterations default to mosquitto_passwd's 101: the broker re-hashes on every CONNECT, so a
large count makes a fleet's reconnect storm after a broker restart expensive; the passwords we
generate are 128-bit random, so brute force is not the threat a high count defends against.
tests/test_security_broker.py checks the format against ``mosquitto_passwd`` and a real broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

SALT_LEN = 12
DEFAULT_ITERATIONS = 101
# mosquitto splits lines on ':' and usernames travel in CONNECT; keep them boring.
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class PasswordError(ValueError):
    """A username, password or password-file line that mosquitto would not handle safely."""


def check_username(name: str) -> str:
    """Usernames also appear in ACL files and topics, so no spaces, '#', '+', '/' or ':'."""
    if not USERNAME_RE.match(name):
        raise PasswordError(
            f"invalid username {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)"
        )
    return name


def new_password() -> str:
    """A random 128-bit password, URL-safe text (fits any config file)."""
    return secrets.token_urlsafe(16)


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """The ``$7$`` hash mosquitto 2.0 expects for ``password``."""
    if not password:
        raise PasswordError("empty password")
    if any(c in password for c in "\r\n\0"):
        raise PasswordError("password contains a line break or NUL")
    if not 1 <= iterations <= 10_000_000:
        raise PasswordError(f"iterations must be 1..10,000,000, got {iterations}")
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    if len(salt) != SALT_LEN:
        raise PasswordError(f"salt must be {SALT_LEN} bytes, got {len(salt)}")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (constant-time compare)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise PasswordError(f"not a mosquitto $7$ hash: {hashed[:12]!r}...")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except ValueError as e:
        raise PasswordError(f"malformed $7$ hash: {e}") from e
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(want))
    return hmac.compare_digest(got, want)


def password_file(users: Mapping[str, str], iterations: int = DEFAULT_ITERATIONS) -> str:
    """Text of a mosquitto ``password_file`` for ``{username: plaintext password}``."""
    lines = [
        f"{check_username(u)}:{hash_password(p, iterations=iterations)}"
        for u, p in sorted(users.items())
    ]
    return "\n".join(lines) + "\n"
