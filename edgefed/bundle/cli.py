"""``edgefed bundle inspect|verify|sign``. Exit code 0 ok, 1 refused (reason on stderr)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from edgefed.bundle.builder import sign_bundle
from edgefed.bundle.format import DEFAULT_LIMITS, BundleError, Manifest
from edgefed.bundle.signing import load_signing_key
from edgefed.bundle.unpack import inspect_bundle, read_bundle_file, verify_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="show the manifest (signature NOT checked)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    p = sub.add_parser("verify", help="check signature and every member hash")
    p.add_argument("file")
    p.add_argument("--key", required=True, help="public key file (.pub) or its hex text")
    p = sub.add_parser("sign", help="sign (or re-sign) a bundle")
    p.add_argument("file")
    p.add_argument("--key", required=True, help="private key file")
    p.add_argument("-o", "--output", help="write here instead of replacing FILE")


def _summary(m: Manifest) -> str:
    lines = [
        f"model_version  {m.model_version}",
        f"format         {m.format_version}, opset {m.opset}, created {m.created}, {m.producer}",
    ]
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        for s in specs:
            lines.append(f"{kind:<14} {s.name} {s.dtype}{s.shape}")
    if m.labels:
        lines.append(f"labels         {', '.join(m.labels)}")
    if m.preprocessing:
        lines.append(f"preprocessing  {json.dumps(m.preprocessing, sort_keys=True)}")
    chosen = m.metrics.get("chosen")
    if chosen:
        lines.append(f"chosen stage   {chosen}")
    lines.append(f"train_step     {'yes' if m.train_step else 'no'}")
    for name, info in m.members.items():
        lines.append(f"member         {name:<18} {info.size:>10} B  sha256 {info.sha256[:16]}…")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "inspect":
            m = inspect_bundle(args.file)
            print(json.dumps(asdict(m), indent=1) if args.json else _summary(m))
            print("(signature not checked: use `edgefed bundle verify --key`)", file=sys.stderr)
        elif args.action == "verify":
            m = verify_bundle(args.file, args.key)
            print(f"OK: {args.file} model_version {m.model_version}, {len(m.members)} members")
        else:
            signed = sign_bundle(
                read_bundle_file(args.file, DEFAULT_LIMITS), load_signing_key(args.key)
            )
            out = Path(args.output or args.file)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(signed)
            os.replace(tmp, out)
            print(f"signed: {out}")
    except BundleError as e:
        print(f"REFUSED: {args.file}: {e.reason}", file=sys.stderr)
        return 1
    return 0
