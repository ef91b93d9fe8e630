"""The write-ahead journal of an asynchronous (FedBuff) buffer: what happened since the last
checkpoint, so a coordinator killed mid-buffer resumes exactly where it was.

Why a journal next to the checkpoint rather than a checkpoint per event: the checkpoint
(model, strategy moments, history) is written once per model version; tasks go out and
updates arrive many times per version. Rewriting the whole checkpoint for each would cost
a model-sized fsync per update. The journal appends one short line per event instead,
a dispatch fsynced before it has any effect outside the process (a task is journaled before
it is published), an update flushed and made durable by the next dispatch's fsync (see
:meth:`Journal.update`), and is restarted, empty, right after each checkpoint.

Together they are the restart state: the checkpoint holds the tasks outstanding when the
version closed (``meta["outstanding"]``); the journal, tagged with the checkpoint's
version and run id, holds the tasks dispatched and the update messages that changed state
(accepted into the buffer, or dropped as stale, or a device's error) since. On restart the
engine replays them through the same intake: the partially filled buffer is rebuilt from
the very update bytes (same keys, so a redelivered copy is a duplicate), and updates for
tasks issued before the crash are accepted with their true staleness.

A journal whose tag is not the checkpoint's (the process died between writing the
checkpoint and restarting the journal; or the checkpoint was deleted) describes a state
the checkpoint already contains or a run that is gone: it is ignored. A torn last line
(killed mid-write) is ignored too: that event had not taken effect outside the process.
Tasks that expired are not journaled: restored tasks get a fresh ``round_timeout``.

A dispatch is journaled before its tasks are published, so a kill in between restores tasks
no device received: the restarted engine sends the tasks of the journal's version that are
still out again (``RoundEngine._rebuild_journaled`` says why that is harmless for a device that
did receive one). It rebuilds them from the checkpoint's weights and the dispatch line,
which also carries each task's ``plan`` (seed, uplink spec, graph included or not: a few
bytes), so they come back byte for byte; journaling the task bytes instead would fsync a
model-sized payload per task. The format stays ``edgefed.async-journal/1``: ``plan`` is an
optional key (a journal without it, from an older coordinator, rebuilds the tasks with a
fresh seed; an older coordinator reading a new journal ignores it).

:func:`crash_point` is a TEST HOOK for the crash tests: inert unless its environment
variable is set.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from edgefed.atomic import atomic_write

__all__ = [
    "CRASH_ENV",
    "CRASH_EXIT_CODE",
    "Journal",
    "crash_point",
    "decode_update",
    "journal_path",
]

FORMAT = "edgefed.async-journal/1"

log = logging.getLogger(__name__)


def journal_path(checkpoint: str | Path) -> Path:
    """The journal that belongs to ``checkpoint`` (``<checkpoint>.journal``)."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".journal")


class Journal:
    """Append-only, fsynced JSON lines: a header ``{"format", "version", "run_id"}``, then
    events ``{"dispatch": {...}}`` / ``{"update": [device, base64 message]}``."""

    def __init__(self, path: str | Path, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self._f: IO[bytes] | None = None

    def read(self, version: int, run_id: str) -> list[dict[str, Any]]:
        """The events journaled since the checkpoint of ``version`` in run ``run_id``
        ([] if there is no journal or it belongs to another checkpoint)."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        try:
            head = json.loads(lines[0])
        except ValueError:
            log.warning("%s: unreadable header: journal ignored", self.path)
            return []
        if head != {"format": FORMAT, "version": version, "run_id": run_id}:
            return []
        events = []
        for n, line in enumerate(lines[1:], 2):
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                log.warning("%s: line %d torn (killed mid-write): ignored", self.path, n)
                break
            if isinstance(ev, dict) and len(ev) == 1 and next(iter(ev)) in ("dispatch", "update"):
                events.append(ev)
            else:
                log.warning("%s: line %d is not an event: ignored", self.path, n)
        return events

    def start(self, version: int, run_id: str, events: Sequence[dict[str, Any]] = ()) -> None:
        """Replace the journal (atomically) by one for the checkpoint of ``version``,
        holding ``events``, and keep it open for appending."""
        self.close()
        head = {"format": FORMAT, "version": version, "run_id": run_id}
        body = b"".join(json.dumps(e).encode() + b"\n" for e in [head, *events])
        atomic_write(self.path, body, self.durable)
        self._f = open(self.path, "ab")  # noqa: SIM115 (kept open between events)

    def dispatched(
        self,
        seq: int,
        version: int,
        tasks: dict[str, str],
        plan: dict[str, list[Any]] | None = None,
    ) -> None:
        """Tasks ``device -> graph`` of dispatch ``seq`` on model ``version``; ``plan``:
        device -> ``[seed, uplink spec, graph included]``, what rebuilds each task byte for
        byte after a restart (see ``RoundEngine._rebuild_journaled``)."""
        ev: dict[str, Any] = {"seq": seq, "version": version, "tasks": tasks}
        if plan is not None:
            ev["plan"] = plan
        self._append({"dispatch": ev})

    def update(self, device: str, data: bytes) -> None:
        """An update message that changed the engine's state.

        Written and flushed (a killed process loses nothing: the line is in the page cache)
        but not fsynced on its own: the next dispatch's fsync, which in async mode follows
        an accepted update at once (the device that answered gets a new task), makes it
        durable with its dispatch -- a group commit that halves the fsyncs. A power loss in
        between loses at most those updates' lines; each costs one task expiring as
        ``deadline`` after the restart, never a double count (the broker already had the
        message acknowledged, so a sync-per-line journal had the same window)."""
        self._append({"update": [device, base64.b64encode(data).decode()]}, sync=False)

    def _append(self, event: dict[str, Any], sync: bool = True) -> None:
        if self._f is None:
            raise RuntimeError("journal not started")
        self._f.write(json.dumps(event).encode() + b"\n")
        self._f.flush()
        if self.durable and sync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def decode_update(event: dict[str, Any]) -> tuple[str, bytes]:
    device, b64 = event["update"]
    return str(device), base64.b64decode(b64)


# ---- TEST HOOK: fault injection for the crash tests (tests/test_reliability_resend.py) ----
CRASH_ENV = "EDGEFED_TEST_CRASH_AT"  # "<point>:<version>", e.g. "dispatched:1"
CRASH_EXIT_CODE = 86


def crash_point(point: str, version: int, flush: Callable[[], object] | None = None) -> None:
    """TEST HOOK, inert unless ``EDGEFED_TEST_CRASH_AT`` is ``<point>:<version>``: then the
    process ends at once at ``point`` on model ``version`` with exit code 86, no cleanup
    (``os._exit``: as abrupt as SIGKILL, but at an exact place, which a signal from a test
    cannot hit). Points: ``checkpointed`` (the version's checkpoint is written and its
    journal started, nothing dispatched on it), ``dispatched`` (a dispatch is journaled,
    its tasks not yet built or published) and ``published`` (its tasks are published;
    ``flush`` first waits for the broker's acknowledgements)."""
    if os.environ.get(CRASH_ENV) != f"{point}:{version}":
        return
    if flush is not None:
        flush()
    log.warning("%s=%s: exiting now (test hook)", CRASH_ENV, os.environ[CRASH_ENV])
    logging.shutdown()
    os._exit(CRASH_EXIT_CODE)
