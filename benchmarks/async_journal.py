"""What crash survival costs an asynchronous (FedBuff) coordinator: the write-ahead journal.

The same async run (digits, 20 in-process devices, MLP 64-128-10, ``buffer_size`` 5,
every update real: trained in onnxruntime, int8-compressed, checked, aggregated) three ways,
interleaved and repeated (the machine is shared and noisy):

- ``no checkpoint``: nothing on disk;
- ``checkpoint only``: an atomic checkpoint per model version, no journal (the state before
  the journal existed: tasks out at a crash were forgotten). The journal is switched off by
  handing the loop a journal class that writes nothing;
- ``checkpoint + journal``: the default; one fsynced line per dispatch and per update.

Reported: real milliseconds per model version (median of the repeats) and the journal's
share; bytes journaled per version.

    python benchmarks/async_journal.py                 # ~1-2 min
    python benchmarks/async_journal.py --versions 40 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table, write_json


class _NoJournal:
    """The loop's journal with every write dropped (the pre-journal baseline)."""

    def __init__(self, path: Path, durable: bool = True) -> None:
        self.path = path

    def read(self, version: int, run_id: str) -> list[dict[str, Any]]:
        return []

    def start(self, *args: Any) -> None:
        return None

    def dispatched(self, *args: Any) -> None:
        return None

    def update(self, *args: Any) -> None:
        return None

    def close(self) -> None:
        return None


def _run(kind: str, versions: int, data: Any, test: Any, fm: Any, work: Path) -> dict[str, Any]:
    import edgefed
    from edgefed.coordinator import journal as journal_mod
    from edgefed.coordinator import loop

    loop.Journal = _NoJournal if kind == "checkpoint only" else journal_mod.Journal  # type: ignore[misc, assignment]
    ck = None if kind == "no checkpoint" else work / f"ck-{time.monotonic_ns()}.npz"
    t0 = time.perf_counter()
    h = edgefed.simulate(
        None, data, rounds=versions, mode="async", buffer_size=5, max_staleness=20,
        federated_model=fm, test_data=test, checkpoint=ck, seed=0,
    )  # fmt: skip
    s = time.perf_counter() - t0
    jb = journal_mod.journal_path(ck).stat().st_size if ck and kind.endswith("journal") else 0
    return {"seconds": s, "ms_per_version": 1e3 * s / versions, "acc": h.final_accuracy,
            "journal_bytes_last": jb}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=30, help="model versions per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    a = ap.parse_args(argv)
    import torch

    from edgefed.coordinator.model import build_federated_model
    from edgefed.zoo import models
    from edgefed.zoo.data import digits_federated

    devs, test = digits_federated(20, 0.5, 0)
    torch.manual_seed(0)
    net = models.digits_mlp(64)
    ex = (torch.from_numpy(devs[0][0][:8].copy()), torch.from_numpy(devs[0][1][:8].copy()))
    fm = build_federated_model(net, ex)
    kinds = ["no checkpoint", "checkpoint only", "checkpoint + journal"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="edgefed-journal-bench-") as tmp:
        _run("no checkpoint", 2, devs, test, fm, Path(tmp))  # warm-up
        for _ in range(a.repeats):
            for k in kinds:
                runs[k].append(_run(k, a.versions, devs, test, fm, Path(tmp)))
    med = {k: statistics.median(r["ms_per_version"] for r in v) for k, v in runs.items()}
    rows = [
        [k, f"{med[k]:.1f}", f"{med[k] - med['checkpoint only']:+.1f}",
         f"{100 * runs[k][-1]['acc']:.1f}%"]
        for k in kinds
    ]  # fmt: skip
    print(f"machine: {machine()}")
    print(f"{a.versions} versions x {a.repeats} repeats, buffer_size 5, 20 devices (median)")
    print(table(["run", "ms / version", "vs checkpoint only", "final acc"], rows))
    path = write_json("async_journal", {"machine": machine(), "versions": a.versions,
                                        "runs": runs, "median_ms_per_version": med})  # fmt: skip
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
