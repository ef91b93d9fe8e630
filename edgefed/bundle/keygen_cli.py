"""``edgefed keygen``: write an Ed25519 key pair for signing bundles."""

from __future__ import annotations

import argparse
import sys

from edgefed.bundle.format import BundleError
from edgefed.bundle.signing import key_id, load_verify_key, write_keypair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("private_key", help="path of the private key file (public: <path>.pub)")
    parser.add_argument("--force", action="store_true", help="overwrite existing key files")


def run(args: argparse.Namespace) -> int:
    try:
        pub = write_keypair(args.private_key, overwrite=args.force)
    except BundleError as e:
        print(f"error: {e.reason}", file=sys.stderr)
        return 1
    print(f"private key: {args.private_key} (mode 0600, keep it on the coordinator)")
    print(f"public key:  {pub} (key id {key_id(load_verify_key(pub))}, give it to devices)")
    return 0
