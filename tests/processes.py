"""Helpers shared by tests that start real worker processes."""

from __future__ import annotations

import subprocess


def stop_processes(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM every process still running, then wait; kill whatever ignores it."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
