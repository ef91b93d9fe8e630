"""Atomic file replacement: the one write-then-rename every persistent file goes through.

Why one helper: checkpoints, device state, error-feedback residuals, bundles and secrets
must each leave either the old or the new file after a crash at any instant, never a torn
one. The recipe is short but easy to get subtly wrong (temp file in the *same* directory so
the rename cannot cross file systems, fsync before the rename, fsync of the directory so
the rename itself survives power loss, no temp file left behind on error), so it lives here
once. Torch-free and dependency-free: the device agent uses it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename (or create / unlink) inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    durable: bool = True,
    *,
    mode: int | None = None,
) -> None:
    """Replace ``path`` by ``data`` atomically (readers see the old or the new file).

    ``durable`` adds the fsyncs that make the result survive power loss (the in-process
    simulation turns them off: it only needs the rename's atomicity). The file is created
    0600 (mkstemp), so a secret is never readable by others, even briefly; ``mode`` sets
    other permissions (e.g. ``0o644`` for a bundle to share) before any byte is written.
    The temp file is ``.<name>.<random>.tmp`` in the same directory, removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:  # the rename itself survives power loss only once the directory is synced
        fsync_dir(path.parent)
