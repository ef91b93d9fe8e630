"""Bundle round trip, signatures, malicious archives, atomic install and rollback.

All with real files, real zip archives and real onnxruntime sessions.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefed.bundle import (
    BundleError,
    Limits,
    Manifest,
    TensorSpec,
    build_bundle,
    current,
    generate_keypair,
    inspect_bundle,
    install_bundle,
    rollback,
    sign_bundle,
    verify_bundle,
    verify_bytes,
)
from edgefed.bundle.format import write_archive
from edgefed.bundle.signing import sign_manifest


def tiny_onnx(scale: float = 1.0, op: str = "MatMul") -> bytes:
    """y = x @ W (4 -> 3) with a dynamic batch; op='Bogus' gives a model that fails to load."""
    w = numpy_helper.from_array((np.eye(4, 3) * scale).astype(np.float32), "W")
    node = helper.make_node(op, ["x", "W"], ["y"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def tiny_manifest(version: str = "v1") -> Manifest:
    return Manifest(
        model_version=version,
        inputs=[TensorSpec("x", ["batch", 4], "float32")],
        outputs=[TensorSpec("y", ["batch", 3], "float32")],
        opset=17,
        labels=["a", "b", "c"],
        preprocessing={"scale": 1.0},
        metrics={"chosen": "fp32"},
    )


@pytest.fixture(scope="module")
def keys():
    return generate_keypair()


def make(keys, version: str = "v1", scale: float = 1.0, op: str = "MatMul", **kw) -> bytes:
    sk, _ = keys
    return build_bundle(tiny_onnx(scale, op), tiny_manifest(version), signing_key=sk, **kw)


def write(tmp_path: Path, data: bytes, name: str = "b.efb") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def raw_zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names; we want them
        with zipfile.ZipFile(buf, "w") as zf:
            for info, data in entries:
                zf.writestr(info, data)
    return buf.getvalue()


def signed_entries(keys, extra: dict[str, bytes] | None = None) -> list:
    """The members of a valid signed bundle, to be altered by a test."""
    with zipfile.ZipFile(io.BytesIO(make(keys))) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    return entries + list((extra or {}).items())


# --- round trip and signatures -------------------------------------------------------------


def test_round_trip_with_train_step(keys, tmp_path):
    _, vk = keys
    data = make(keys, train_step_onnx=tiny_onnx(2.0), train_step_manifest={"lr": "input"})
    m = verify_bundle(write(tmp_path, data), bytes(vk))
    assert m.model_version == "v1" and m.labels == ["a", "b", "c"]
    assert set(m.members) == {"model.onnx", "train_step.onnx", "train_step.json"}
    assert m.train_step == {"model": "train_step.onnx", "manifest": "train_step.json"}
    assert m.inputs[0].shape == ["batch", 4] and m.created.endswith("Z")


def test_bundle_bytes_are_deterministic(keys):
    sk, _ = keys
    m1, m2 = tiny_manifest(), tiny_manifest()
    m1.created = m2.created = "2026-01-01T00:00:00Z"
    a = build_bundle(tiny_onnx(), m1, signing_key=sk)
    b = build_bundle(tiny_onnx(), m2, signing_key=sk)
    assert a == b


def test_unsigned_refused_then_signed_accepted(keys, tmp_path):
    sk, vk = keys
    unsigned = build_bundle(tiny_onnx(), tiny_manifest())
    with pytest.raises(BundleError, match="unsigned"):
        verify_bytes(unsigned, vk)
    assert inspect_bundle(write(tmp_path, unsigned)).model_version == "v1"
    assert verify_bytes(sign_bundle(unsigned, sk), vk).manifest.model_version == "v1"


def test_wrong_key_refused(keys):
    _, other_vk = generate_keypair()
    with pytest.raises(BundleError, match=r"bad signature.*signed by key"):
        verify_bytes(make(keys), other_vk)


def test_tampered_member_refused(keys):
    _, vk = keys
    entries = [(n, tiny_onnx(9.0) if n == "model.onnx" else d) for n, d in signed_entries(keys)]
    with pytest.raises(BundleError, match=r"'model.onnx'.*(sha256|bytes)"):
        verify_bytes(write_archive(entries), vk)


def test_tampered_manifest_refused(keys):
    _, vk = keys
    entries = []
    for n, d in signed_entries(keys):
        if n == "manifest.json":
            obj = json.loads(d)
            obj["labels"] = ["x", "y", "z"]
            d = json.dumps(obj).encode()
        entries.append((n, d))
    with pytest.raises(BundleError, match=r"bad signature.*tampered"):
        verify_bytes(write_archive(entries), vk)


def test_truncated_refused(keys):
    _, vk = keys
    data = make(keys)
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(BundleError, match="truncated or corrupt"):
            verify_bytes(data[:cut], vk)


def test_unlisted_and_missing_members_refused(keys):
    _, vk = keys
    with pytest.raises(BundleError, match="not listed"):
        verify_bytes(write_archive(signed_entries(keys, {"extra.bin": b"x"})), vk)
    entries = [(n, d) for n, d in signed_entries(keys) if n != "model.onnx"]
    with pytest.raises(BundleError, match="missing"):
        verify_bytes(write_archive(entries), vk)


def test_bad_signature_document_refused(keys):
    _, vk = keys
    entries = [(n, b"{not json" if n == "signature.json" else d) for n, d in signed_entries(keys)]
    with pytest.raises(BundleError, match=r"signature.json is not valid JSON"):
        verify_bytes(write_archive(entries), vk)


def test_signed_but_invalid_manifest_refused(keys):
    """A validly signed manifest is still schema-checked (a key holder's bug is caught)."""
    sk, vk = keys
    bad = json.dumps({"format_version": 99}).encode()
    entries = [("manifest.json", bad), ("signature.json", sign_manifest(bad, sk))]
    with pytest.raises(BundleError, match="format_version 99"):
        verify_bytes(write_archive(entries), vk)


# --- malicious archives ---------------------------------------------------------------------


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


MALICIOUS = {
    "dotdot": ([("../evil.onnx", b"x")], "escaping path"),
    "dotdot_nested": ([("a/../../evil", b"x")], "escaping path"),
    "absolute": ([("/tmp/evil.onnx", b"x")], "absolute"),
    "subdir": ([("sub/model.onnx", b"x")], "not a plain file name"),
    "backslash": ([("..\\evil", b"x")], "absolute or escaping"),
    "symlink": ([(_symlink_info("evil_link"), b"/etc/passwd")], "symlink"),
    "directory": ([("model.onnx/", b"")], "plain file name|not a regular file"),
    "duplicate": ([("model.onnx", b"a"), ("model.onnx", b"b")], "duplicate member"),
    "hidden": ([(".model.onnx", b"x")], "not a plain file name"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_refused_and_nothing_written(keys, tmp_path, case):
    _, vk = keys
    extra, reason = MALICIOUS[case]
    data = raw_zip(signed_entries(keys) + extra)
    root = tmp_path / "dev" / "root"
    with pytest.raises(BundleError, match=reason):
        install_bundle(write(tmp_path, data), vk, root)
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert written <= {"b.efb", "dev", "dev/root", "dev/root/.lock"}, written
    assert current(root) is None


def test_member_count_and_size_limits_checked_before_reading(keys):
    _, vk = keys
    data = make(keys)
    with pytest.raises(BundleError, match="members, over the 2 limit"):
        verify_bytes(data, vk, Limits(max_members=2))
    with pytest.raises(BundleError, match=r"'model.onnx' is .* bytes, over the 10 limit"):
        verify_bytes(data, vk, Limits(max_member_bytes=10))
    with pytest.raises(BundleError, match="members total"):
        verify_bytes(data, vk, Limits(max_total_bytes=100))
    with pytest.raises(BundleError, match="over the 50 limit"):
        verify_bytes(data, vk, Limits(max_file_bytes=50))


def test_zip_bomb_with_lying_size_header_refused(keys):
    """A member whose central-directory size understates its content is refused."""
    _, vk = keys
    entries = signed_entries(keys, {"pad.bin": b"\0" * 100_000})
    data = bytearray(write_archive(entries))
    # patch the uncompressed size (offset 24) of the last central directory entry (pad.bin)
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (1000).to_bytes(4, "little")
    with pytest.raises(BundleError, match=r"pad.bin"):
        verify_bytes(bytes(data), vk)


# --- install / rollback ----------------------------------------------------------------------


def _run(installed) -> np.ndarray:
    sess = ort.InferenceSession(str(installed.model_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.ones((2, 4), np.float32)})[0]


def test_install_swap_rollback(keys, tmp_path):
    _, vk = keys
    root = tmp_path / "models"
    a = install_bundle(write(tmp_path, make(keys, "v1", 1.0), "a"), vk, root)
    assert current(root).manifest.model_version == "v1"
    assert os.readlink(root / "current") == f"versions/{a.path.name}"
    b = install_bundle(write(tmp_path, make(keys, "v2", 2.0), "b"), vk, root)
    assert current(root).manifest.model_version == "v2"
    assert float(_run(current(root))[0, 0]) == 2.0
    back = rollback(root)
    assert back.manifest.model_version == "v1" and current(root).path == a.path
    assert float(_run(current(root))[0, 0]) == 1.0
    assert rollback(root).path == b.path  # rollback toggles back
    assert not list(root.glob(".staging-*")) and not list(root.glob(".*.tmp-*"))


def test_model_that_fails_to_load_is_not_installed(keys, tmp_path):
    _, vk = keys
    root = tmp_path / "models"
    good = install_bundle(write(tmp_path, make(keys, "v1"), "a"), vk, root)
    bad = write(tmp_path, make(keys, "v2", op="BogusOp"), "bad")
    verify_bundle(bad, vk)  # signature and hashes are fine: only loading fails
    with pytest.raises(BundleError, match=r"load check failed.*onnxruntime"):
        install_bundle(bad, vk, root)
    assert current(root).path == good.path
    assert [p.name for p in (root / "versions").iterdir()] == [good.path.name]
    assert not list(root.glob(".staging-*"))


def test_agent_detected_failure_rolls_back(keys, tmp_path):
    """A custom load check (the agent's) that fails leaves the old version active."""
    _, vk = keys
    root = tmp_path / "models"
    install_bundle(write(tmp_path, make(keys, "v1"), "a"), vk, root)

    def too_slow(directory: Path, manifest: Manifest) -> None:
        raise BundleError("latency 80 ms over the 10 ms budget")

    with pytest.raises(BundleError, match="latency 80 ms"):
        install_bundle(write(tmp_path, make(keys, "v2"), "b"), vk, root, load_check=too_slow)
    assert current(root).manifest.model_version == "v1"
    with pytest.raises(BundleError, match="no previous version"):
        rollback(root)


def test_old_versions_pruned(keys, tmp_path):
    _, vk = keys
    root = tmp_path / "models"
    for i in range(5):
        install_bundle(write(tmp_path, make(keys, f"v{i}", float(i + 1)), f"{i}"), vk, root, keep=3)
    assert len(list((root / "versions").iterdir())) == 3
    assert current(root).manifest.model_version == "v4"
    assert rollback(root).manifest.model_version == "v3"


def test_onnx_checker_accepts_tiny_model():
    onnx.checker.check_model(onnx.load_from_string(tiny_onnx()), full_check=True)


# --- CLI ---------------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "edgefed", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_cli_keygen_sign_verify_inspect(tmp_path):
    r = _cli("keygen", "k", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert _cli("keygen", "k", cwd=tmp_path).returncode == 1  # refuses to overwrite
    (tmp_path / "m.efb").write_bytes(build_bundle(tiny_onnx(), tiny_manifest("v7")))
    r = _cli("bundle", "verify", "m.efb", "--key", "k.pub", cwd=tmp_path)
    assert r.returncode == 1 and "unsigned" in r.stderr
    assert _cli("bundle", "sign", "m.efb", "--key", "k", cwd=tmp_path).returncode == 0
    r = _cli("bundle", "verify", "m.efb", "--key", "k.pub", cwd=tmp_path)
    assert r.returncode == 0 and "v7" in r.stdout, r.stderr
    r = _cli("bundle", "inspect", "m.efb", cwd=tmp_path)
    assert r.returncode == 0 and "model.onnx" in r.stdout and "x float32['batch', 4]" in r.stdout
    (tmp_path / "m.efb").write_bytes((tmp_path / "m.efb").read_bytes()[:-5])
    r = _cli("bundle", "verify", "m.efb", "--key", "k.pub", cwd=tmp_path)
    assert r.returncode == 1 and "truncated" in r.stderr
