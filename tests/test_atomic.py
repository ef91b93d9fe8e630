"""edgefed.atomic: the one write-then-rename every persistent file goes through."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from edgefed.atomic import atomic_write


class Unwritable:
    """A buffer whose write fails half-way (as a full disk would)."""

    def __buffer__(self, flags: int) -> memoryview:
        raise OSError(28, "No space left on device")


def test_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "state.json"
    atomic_write(p, b"old")
    atomic_write(p, b"new", durable=False)
    assert p.read_bytes() == b"new"
    assert sorted(x.name for x in p.parent.iterdir()) == ["state.json"]


def test_secret_is_0600_and_mode_is_applied(tmp_path: Path) -> None:
    atomic_write(tmp_path / "key", b"s")
    atomic_write(tmp_path / "bundle.efb", b"b", mode=0o644)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "bundle.efb").stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    p = tmp_path / "ckpt.npz"
    atomic_write(p, b"old")
    with pytest.raises((OSError, TypeError)):
        atomic_write(p, Unwritable())  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["ckpt.npz"]
