"""Writing bundles: members + manifest (+ signature) -> one deterministic zip."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from nacl.signing import SigningKey

from edgefed.bundle.format import (
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    MODEL_NAME,
    SIGNATURE_NAME,
    TRAIN_STEP_MANIFEST_NAME,
    TRAIN_STEP_NAME,
    Limits,
    Manifest,
    check_members,
    finalize_manifest,
    read_archive,
    write_archive,
)
from edgefed.bundle.signing import sign_manifest


def build_bundle(
    model_onnx: bytes,
    manifest: Manifest,
    *,
    train_step_onnx: bytes | None = None,
    train_step_manifest: dict[str, Any] | None = None,
    signing_key: SigningKey | None = None,
) -> bytes:
    """Return the bundle bytes. Unsigned when ``signing_key`` is None (sign later)."""
    members = {MODEL_NAME: model_onnx}
    manifest = replace(manifest)
    if (train_step_onnx is None) != (train_step_manifest is None):
        raise ValueError("train_step_onnx and train_step_manifest go together")
    if train_step_onnx is not None:
        members[TRAIN_STEP_NAME] = train_step_onnx
        members[TRAIN_STEP_MANIFEST_NAME] = json.dumps(
            train_step_manifest, sort_keys=True, allow_nan=False
        ).encode()
        manifest.train_step = {"model": TRAIN_STEP_NAME, "manifest": TRAIN_STEP_MANIFEST_NAME}
    manifest = finalize_manifest(manifest, members)
    manifest_bytes = manifest.to_json()
    Manifest.from_json(manifest_bytes)  # never write a manifest we would refuse to read
    entries = [(MANIFEST_NAME, manifest_bytes)]
    if signing_key is not None:
        entries.append((SIGNATURE_NAME, sign_manifest(manifest_bytes, signing_key)))
    entries += sorted(members.items())
    return write_archive(entries)


def sign_bundle(data: bytes, signing_key: SigningKey, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """(Re-)sign an existing bundle after checking its members match its manifest."""
    raw = read_archive(data, limits)
    manifest = Manifest.from_json(raw.manifest_bytes)
    check_members(manifest, raw.members)
    entries = [
        (MANIFEST_NAME, raw.manifest_bytes),
        (SIGNATURE_NAME, sign_manifest(raw.manifest_bytes, signing_key)),
    ]
    return write_archive(entries + sorted(raw.members.items()))
