"""Signed model bundles: build, verify, install atomically, roll back. Torch-free.

Device-side API::

    manifest = verify_bundle(path, public_key)          # raises BundleError(reason)
    installed = install_bundle(path, public_key, root)  # verify + load check + atomic swap
    rollback(root); current(root)
"""

from edgefed.bundle.builder import build_bundle, sign_bundle
from edgefed.bundle.format import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    BundleError,
    Limits,
    Manifest,
    MemberInfo,
    TensorSpec,
)
from edgefed.bundle.signing import (
    generate_keypair,
    load_signing_key,
    load_verify_key,
    write_keypair,
)
from edgefed.bundle.unpack import (
    InstalledBundle,
    current,
    default_load_check,
    inspect_bundle,
    install_bundle,
    rollback,
    verify_bundle,
    verify_bytes,
)

__all__ = [
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "BundleError",
    "InstalledBundle",
    "Limits",
    "Manifest",
    "MemberInfo",
    "TensorSpec",
    "build_bundle",
    "current",
    "default_load_check",
    "generate_keypair",
    "inspect_bundle",
    "install_bundle",
    "load_signing_key",
    "load_verify_key",
    "rollback",
    "sign_bundle",
    "verify_bundle",
    "verify_bytes",
    "write_keypair",
]
