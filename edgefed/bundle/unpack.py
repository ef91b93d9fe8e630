"""Verify and install bundles on a device: atomic swap, rollback, load check.

Install layout under ``root_dir``::

    versions/<model_version>-<manifest sha256[:12]>/   one verified, unpacked bundle each
    current  -> versions/...    symlink the runtime loads from
    previous -> versions/...    what rollback() returns to
    .staging-*                  temp dirs (same filesystem, so rename is atomic)
    .lock                       flock: one install/rollback at a time

Why the load check runs *before* the swap: a model that cannot create an onnxruntime
session never becomes ``current``, so no reader ever sees it. Failures found later by
the runtime (the agent) are handled with ``rollback()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.atomic import fsync_dir
from edgefed.bundle.format import (
    DEFAULT_LIMITS,
    MANIFEST_NAME,
    MODEL_NAME,
    SIGNATURE_NAME,
    BundleError,
    Limits,
    Manifest,
    check_members,
    read_archive,
    sha256_hex,
)
from edgefed.bundle.signing import VerifyKey, load_verify_key, verify_manifest_signature

LoadCheck = Callable[[Path, Manifest], None]
_NP_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "float64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "bool": np.bool_,
}


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    manifest_bytes: bytes
    signature_bytes: bytes
    members: dict[str, bytes]


@dataclass(frozen=True)
class InstalledBundle:
    path: Path  # the versions/<name> directory
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME


def read_bundle_file(path: str | os.PathLike[str], limits: Limits) -> bytes:
    try:
        size = os.stat(path).st_size
        if size > limits.max_file_bytes:
            raise BundleError(f"bundle is {size} bytes, over the {limits.max_file_bytes} limit")
        with open(path, "rb") as f:
            return f.read(limits.max_file_bytes + 1)
    except OSError as e:
        raise BundleError(f"cannot read bundle {path}: {e}") from None


def verify_bytes(
    data: bytes,
    public_key: str | os.PathLike[str] | bytes | VerifyKey,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedBundle:
    """Limits -> signature over the manifest -> manifest schema -> every member's hash."""
    vk = load_verify_key(public_key)
    raw = read_archive(data, limits)
    verify_manifest_signature(raw.manifest_bytes, raw.signature_bytes, vk)
    manifest = Manifest.from_json(raw.manifest_bytes)
    check_members(manifest, raw.members)
    assert raw.signature_bytes is not None
    return VerifiedBundle(manifest, raw.manifest_bytes, raw.signature_bytes, raw.members)


def verify_bundle(
    path: str | os.PathLike[str],
    public_key: str | os.PathLike[str] | bytes | VerifyKey,
    limits: Limits = DEFAULT_LIMITS,
) -> Manifest:
    """Raise BundleError(reason) unless the bundle at ``path`` is intact and signed by the key."""
    return verify_bytes(read_bundle_file(path, limits), public_key, limits).manifest


def inspect_bundle(path: str | os.PathLike[str], limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Read the manifest WITHOUT checking the signature (for display only; hashes are checked)."""
    raw = read_archive(read_bundle_file(path, limits), limits)
    manifest = Manifest.from_json(raw.manifest_bytes)
    check_members(manifest, raw.members)
    return manifest


def _dummy_inputs(manifest: Manifest) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in manifest.inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, dtype=_NP_DTYPES[spec.dtype])
    return feeds


def default_load_check(directory: Path, manifest: Manifest) -> None:
    """Create an onnxruntime session and run one dummy batch; outputs must be finite."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(
            str(directory / MODEL_NAME), opts, providers=["CPUExecutionProvider"]
        )
        outs = sess.run([o.name for o in manifest.outputs], _dummy_inputs(manifest))
    except Exception as e:  # onnxruntime raises several unrelated types
        raise BundleError(f"model does not load or run in onnxruntime: {e}") from None
    for spec, out in zip(manifest.outputs, outs, strict=True):
        arr = np.asarray(out)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BundleError(f"model output {spec.name!r} is not finite on a dummy batch")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_new(directory: Path, name: str, data: bytes) -> None:
    # O_EXCL | O_NOFOLLOW: never write through a planted symlink or over an existing file.
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _point(root: Path, link: str, target: str | None) -> None:
    """Atomically make root/link -> target (relative), or remove it when target is None."""
    path = root / link
    if target is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = root / f".{link}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)


def _target(root: Path, link: str) -> str | None:
    try:
        t = os.readlink(root / link)
    except (FileNotFoundError, OSError):
        return None
    return t if (root / t).is_dir() else None


def _load_installed(root: Path, rel: str) -> InstalledBundle:
    path = root / rel
    try:
        data = (path / MANIFEST_NAME).read_bytes()
    except OSError as e:
        raise BundleError(f"installed bundle {path} has no readable manifest: {e}") from None
    return InstalledBundle(path, Manifest.from_json(data))


def current(root_dir: str | os.PathLike[str]) -> InstalledBundle | None:
    """The active bundle, or None when nothing is installed."""
    root = Path(root_dir)
    rel = _target(root, "current")
    return None if rel is None else _load_installed(root, rel)


def install_bundle(
    path: str | os.PathLike[str],
    public_key: str | os.PathLike[str] | bytes | VerifyKey,
    root_dir: str | os.PathLike[str],
    *,
    load_check: LoadCheck | None = default_load_check,
    keep: int = 3,
    limits: Limits = DEFAULT_LIMITS,
) -> InstalledBundle:
    """Verify, unpack to a staging dir, load-check, then swap ``current`` atomically.

    On any failure nothing visible changes and BundleError(reason) is raised.
    """
    root = Path(root_dir)
    vb = verify_bytes(read_bundle_file(path, limits), public_key, limits)
    name = f"{vb.manifest.model_version}-{sha256_hex(vb.manifest_bytes)[:12]}"
    rel = f"versions/{name}"
    with _locked(root):
        (root / "versions").mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            _write_new(staging, MANIFEST_NAME, vb.manifest_bytes)
            _write_new(staging, SIGNATURE_NAME, vb.signature_bytes)
            for member, blob in vb.members.items():
                _write_new(staging, member, blob)
            if load_check is not None:
                try:
                    load_check(staging, vb.manifest)
                except BundleError as e:
                    raise BundleError(f"load check failed, not installed: {e.reason}") from None
            if not (root / rel).is_dir():
                os.rename(staging, root / rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        old = _target(root, "current")
        if old != rel:
            if old is not None:
                _point(root, "previous", old)
            _point(root, "current", rel)
        fsync_dir(root)
        _prune(root, keep)
    return InstalledBundle(root / rel, vb.manifest)


def rollback(root_dir: str | os.PathLike[str]) -> InstalledBundle:
    """Swap ``current`` and ``previous``; raise BundleError if there is no previous version."""
    root = Path(root_dir)
    with _locked(root):
        prev, cur = _target(root, "previous"), _target(root, "current")
        if prev is None:
            raise BundleError(f"no previous version to roll back to in {root}")
        _point(root, "current", prev)
        _point(root, "previous", cur)
        fsync_dir(root)
        return _load_installed(root, prev)


def roll_back_version(root_dir: str | os.PathLike[str], version: str) -> InstalledBundle | None:
    """Undo a canary: if ``version`` is current, make ``previous`` current again, or, when
    it was the first bundle ever installed, remove ``current`` (the device then runs its
    federated model again). Returns the bundle active afterwards (None: no bundle).
    Nothing changes when ``version`` is not current."""
    root = Path(root_dir)
    with _locked(root):
        cur = _target(root, "current")
        if cur is None or _load_installed(root, cur).manifest.model_version != version:
            return None if cur is None else _load_installed(root, cur)
        prev = _target(root, "previous")
        _point(root, "current", prev)
        _point(root, "previous", None)
        fsync_dir(root)
        return None if prev is None else _load_installed(root, prev)


def _prune(root: Path, keep: int) -> None:
    """Delete the oldest versions beyond ``keep``, never current or previous."""
    live = {_target(root, "current"), _target(root, "previous")}
    dirs = sorted((root / "versions").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for d in dirs[max(keep, 2) :]:
        if f"versions/{d.name}" not in live:
            shutil.rmtree(d, ignore_errors=True)
