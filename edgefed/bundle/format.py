"""The bundle file: one zip archive holding the model, its manifest and a signature.

Why zip (not tar): the central directory lists every member with its sizes, flags and
Unix mode up front, so all limits (member count, names, per-member and total sizes,
symlinks, duplicates) are checked *before* a single byte of content is read, and each
member is read on its own. A tar must be scanned header by header to learn the same.

Layout (flat, no directories; normative description in docs/bundle-format.md)::

    manifest.json    JSON, lists every other member with sha256 and size
    signature.json   Ed25519 signature over  b"edgefed-bundle-v1\\n" + manifest.json bytes
    model.onnx       inference graph
    train_step.onnx  optional: one training step for on-device fine-tuning
    train_step.json  optional: that step's manifest

Everything here is torch-free: devices import it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import stat
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
MODEL_NAME = "model.onnx"
TRAIN_STEP_NAME = "train_step.onnx"
TRAIN_STEP_MANIFEST_NAME = "train_step.json"
RESERVED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
# Flat names only: no separators, no leading dot, so a name can never leave its directory.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_DTYPES = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
# Fixed timestamp: the same members give the same bytes (reproducible bundles).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class BundleError(Exception):
    """Any reason a bundle is refused; ``reason`` is a human-readable sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Checked against the central directory before any member is read."""

    max_file_bytes: int = 1 << 30
    max_members: int = 16
    max_member_bytes: int = 512 << 20
    max_total_bytes: int = 768 << 20
    max_manifest_bytes: int = 1 << 20
    max_signature_bytes: int = 4096


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int | str]  # str = symbolic dimension (e.g. "batch")
    dtype: str

    @staticmethod
    def from_obj(obj: Any, where: str) -> TensorSpec:
        if not isinstance(obj, dict):
            raise BundleError(f"manifest {where} must be an object")
        name, shape, dtype = obj.get("name"), obj.get("shape"), obj.get("dtype")
        if not isinstance(name, str) or not name:
            raise BundleError(f"manifest {where}.name must be a non-empty string")
        if not isinstance(shape, list) or len(shape) > 8:
            raise BundleError(f"manifest {where}.shape must be a list of at most 8 dims")
        for d in shape:
            ok_int = isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31
            if not (ok_int or (isinstance(d, str) and 0 < len(d) <= 64)):
                raise BundleError(f"manifest {where}.shape has an invalid dimension {d!r}")
        if dtype not in _DTYPES:
            raise BundleError(f"manifest {where}.dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return TensorSpec(name, list(shape), dtype)


@dataclass(frozen=True)
class MemberInfo:
    sha256: str
    size: int


@dataclass
class Manifest:
    """What a device needs to run the model without reading the graph first."""

    model_version: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    labels: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    train_step: dict[str, str] | None = None  # {"model": ..., "manifest": ...}
    members: dict[str, MemberInfo] = field(default_factory=dict)
    created: str = ""
    producer: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        obj = asdict(self)
        return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode()

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"manifest.json is not valid UTF-8 JSON: {e}") from None
        if not isinstance(obj, dict):
            raise BundleError("manifest.json must hold a JSON object")
        fv = obj.get("format_version")
        if fv != FORMAT_VERSION:
            raise BundleError(
                f"unsupported bundle format_version {fv!r} (this reads {FORMAT_VERSION})"
            )
        mv = obj.get("model_version")
        if not isinstance(mv, str) or not _NAME_RE.match(mv):
            raise BundleError(f"manifest model_version {mv!r} must match {_NAME_RE.pattern}")
        opset = obj.get("opset")
        if not isinstance(opset, int) or isinstance(opset, bool) or not 1 <= opset <= 100:
            raise BundleError(f"manifest opset {opset!r} is not a valid opset number")
        ins, outs = obj.get("inputs"), obj.get("outputs")
        if not isinstance(ins, list) or not ins or not isinstance(outs, list) or not outs:
            raise BundleError("manifest inputs and outputs must be non-empty lists")
        inputs = [TensorSpec.from_obj(o, f"inputs[{i}]") for i, o in enumerate(ins)]
        outputs = [TensorSpec.from_obj(o, f"outputs[{i}]") for i, o in enumerate(outs)]
        labels = obj.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise BundleError("manifest labels must be a list of strings")
        for key in ("preprocessing", "metrics"):
            if not isinstance(obj.get(key, {}), dict):
                raise BundleError(f"manifest {key} must be an object")
        members_obj = obj.get("members")
        if not isinstance(members_obj, dict) or MODEL_NAME not in members_obj:
            raise BundleError(f"manifest members must be an object listing {MODEL_NAME}")
        members: dict[str, MemberInfo] = {}
        for name, info in members_obj.items():
            check_member_name(name)
            if name in RESERVED:
                raise BundleError(f"manifest members must not list {name}")
            if not isinstance(info, dict):
                raise BundleError(f"manifest members[{name!r}] must be an object")
            digest, size = info.get("sha256"), info.get("size")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise BundleError(f"manifest members[{name!r}].sha256 is not 64 hex digits")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BundleError(f"manifest members[{name!r}].size must be an integer >= 0")
            members[name] = MemberInfo(digest, size)
        ts = obj.get("train_step")
        if ts is not None and (
            not isinstance(ts, dict)
            or set(ts) != {"model", "manifest"}
            or not all(isinstance(v, str) and v in members for v in ts.values())
        ):
            raise BundleError("manifest train_step must name its model and manifest members")
        for key in ("created", "producer"):
            if not isinstance(obj.get(key, ""), str):
                raise BundleError(f"manifest {key} must be a string")
        return Manifest(
            model_version=mv,
            inputs=inputs,
            outputs=outputs,
            opset=opset,
            labels=list(labels),
            preprocessing=dict(obj.get("preprocessing", {})),
            metrics=dict(obj.get("metrics", {})),
            train_step=dict(ts) if ts is not None else None,
            members=members,
            created=obj.get("created", ""),
            producer=obj.get("producer", ""),
        )


def check_member_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise BundleError(f"member name {name!r} is not a plain file name")
    return name


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def finalize_manifest(manifest: Manifest, members: dict[str, bytes]) -> Manifest:
    """Fill in member hashes/sizes and the created time (if unset)."""
    if MODEL_NAME not in members:
        raise BundleError(f"a bundle needs a {MODEL_NAME} member")
    for name in members:
        check_member_name(name)
        if name in RESERVED:
            raise BundleError(f"{name} is reserved for the bundle itself")
    manifest.members = {n: MemberInfo(sha256_hex(b), len(b)) for n, b in sorted(members.items())}
    if not manifest.created:
        manifest.created = utc_now()
    if not manifest.producer:
        from edgefed import __version__

        manifest.producer = f"edgefed {__version__}"
    return manifest


def write_archive(entries: list[tuple[str, bytes]]) -> bytes:
    """Deterministic zip: fixed timestamps, regular-file mode 0644, deflate."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.create_system = 3  # Unix, so the mode above is meaningful
            zf.writestr(info, data)
    return buf.getvalue()


@dataclass
class RawBundle:
    """Archive members read under limits; nothing verified yet beyond structure."""

    manifest_bytes: bytes
    signature_bytes: bytes | None
    members: dict[str, bytes]


def read_archive(data: bytes, limits: Limits = DEFAULT_LIMITS) -> RawBundle:
    """Check the central directory against ``limits``, then read each member bounded."""
    if len(data) > limits.max_file_bytes:
        raise BundleError(f"bundle is {len(data)} bytes, over the {limits.max_file_bytes} limit")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as e:
        raise BundleError(f"not a readable bundle archive (truncated or corrupt): {e}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            n, cap_n = len(infos), limits.max_members
            raise BundleError(f"bundle has {n} members, over the {cap_n} limit")
        seen: set[str] = set()
        total = 0
        for info in infos:
            name = info.filename
            if name in seen:
                raise BundleError(f"duplicate member name {name!r}")
            seen.add(name)
            if name.startswith("/") or "\\" in name or ".." in name.split("/"):
                raise BundleError(f"member {name!r} has an absolute or escaping path")
            check_member_name(name)
            ftype = stat.S_IFMT(info.external_attr >> 16)  # 0 when the writer set no type
            if info.is_dir() or (ftype and ftype != stat.S_IFREG):
                raise BundleError(f"member {name!r} is not a regular file (symlink or directory)")
            if info.flag_bits & 0x1:
                raise BundleError(f"member {name!r} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BundleError(f"member {name!r} uses unsupported compression")
            cap = {
                MANIFEST_NAME: limits.max_manifest_bytes,
                SIGNATURE_NAME: limits.max_signature_bytes,
            }.get(name, limits.max_member_bytes)
            if info.file_size > cap:
                size = info.file_size
                raise BundleError(f"member {name!r} is {size} bytes, over the {cap} limit")
            total += info.file_size
        if total > limits.max_total_bytes:
            cap_t = limits.max_total_bytes
            raise BundleError(f"members total {total} bytes, over the {cap_t} limit")
        if MANIFEST_NAME not in seen:
            raise BundleError("bundle has no manifest.json")
        contents: dict[str, bytes] = {}
        for info in infos:
            try:
                with zf.open(info) as f:
                    blob = f.read(info.file_size + 1)  # +1 catches a lying size header
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
                raise BundleError(f"member {info.filename!r} is corrupt: {e}") from None
            if len(blob) != info.file_size:
                raise BundleError(f"member {info.filename!r} size does not match its header")
            contents[info.filename] = blob
    return RawBundle(
        manifest_bytes=contents.pop(MANIFEST_NAME),
        signature_bytes=contents.pop(SIGNATURE_NAME, None),
        members=contents,
    )


def check_members(manifest: Manifest, members: dict[str, bytes]) -> None:
    """The archive holds exactly the listed members, each with its listed hash and size."""
    listed, present = set(manifest.members), set(members)
    if present - listed:
        raise BundleError(f"members not listed in the manifest: {sorted(present - listed)}")
    if listed - present:
        raise BundleError(f"members missing from the bundle: {sorted(listed - present)}")
    for name, info in manifest.members.items():
        blob = members[name]
        if len(blob) != info.size:
            raise BundleError(f"member {name!r} is {len(blob)} bytes, manifest says {info.size}")
        if sha256_hex(blob) != info.sha256:
            raise BundleError(f"member {name!r} sha256 does not match the manifest (tampered)")
