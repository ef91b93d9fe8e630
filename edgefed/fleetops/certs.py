"""A small certificate authority for a fleet's MQTT broker (coordinator side, ``cryptography``).

Why a private CA: a fleet's broker is usually reached by IP or a private host name that no
public CA will certify, and devices must pin *their* fleet's CA anyway (a public CA would let
anyone with any valid certificate impersonate the broker). The tool writes:

* ``ca.crt`` / ``ca.key``   -- the fleet CA (keep ``ca.key`` offline after set-up),
* ``server.crt`` / ``server.key`` -- the broker's certificate, SANs = the given names/IPs,
* ``clients/<name>.crt`` / ``.key`` -- optional client certificates (mutual TLS).

Keys are ECDSA P-256: small certificates, fast handshakes on a Raspberry Pi, supported by every
OpenSSL that mosquitto and paho link against. Private keys are written 0600, unencrypted PEM
(the broker must read them unattended); protect the directory, not the file format.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefed.atomic import atomic_write

DEFAULT_VALID_DAYS = 825  # the longest leaf lifetime mainstream TLS clients accept


class CertError(ValueError):
    """Bad input for certificate generation (the message names the problem)."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key (in memory)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both PEM files; the key is created 0600 before any byte is written."""
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(key_path, self.key_pem())
        cert_path.write_bytes(self.cert_pem())


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable only by its owner (never world-readable, even briefly)."""
    atomic_write(path, data, mode=0o600)


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:
        raise CertError(f"common name must be 1..64 characters, got {common_name!r}")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefed fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key, days: int
) -> x509.CertificateBuilder:
    if not 1 <= days <= 36500:
        raise CertError(f"validity must be 1..36500 days, got {days}")
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(common_name: str = "edgefed fleet CA", days: int = 3650) -> Issued:
    """A self-signed CA that may only sign leaf certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _leaf(
    ca: Issued,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def parse_hosts(hosts: list[str]) -> list[x509.GeneralName]:
    """Host names and IP addresses -> SAN entries (an IP must be an IP SAN to verify)."""
    out: list[x509.GeneralName] = []
    for h in hosts:
        h = h.strip()
        if not h:
            raise CertError("empty host name in the server certificate's host list")
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_server_cert(ca: Issued, hosts: list[str], days: int = DEFAULT_VALID_DAYS) -> Issued:
    """The broker's certificate; clients verify the host they dial against ``hosts``."""
    if not hosts:
        raise CertError("the server certificate needs at least one host name or IP")
    return _leaf(ca, hosts[0], days, ExtendedKeyUsageOID.SERVER_AUTH, parse_hosts(hosts))


def make_client_cert(ca: Issued, common_name: str, days: int = DEFAULT_VALID_DAYS) -> Issued:
    """A client certificate for mutual TLS (its CN can be mosquitto's username)."""
    return _leaf(ca, common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def load_ca(cert_path: Path, key_path: Path) -> Issued:
    """Load an existing CA so re-running the tool keeps devices' pinned CA valid."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: expected an EC private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise CertError(f"{key_path} does not belong to {cert_path}")
    return Issued(cert, key)
