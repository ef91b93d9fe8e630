"""Per-round metrics: one JSON object per line (append + flush, so a crash loses at most the
line being written) and a one-line live progress display in the terminal."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass
class RoundMetrics:
    round: int
    model_version: str
    sampled: int
    participants: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    drop_log: list[dict[str, str]] = field(default_factory=list)  # [{device, reason}]
    bytes_up: int = 0  # whole update messages as carried by MQTT (minus chunk framing)
    payload_up: int = 0  # of which codec payloads (the compressed tensors + codec header)
    bytes_down: int = 0
    cum_bytes_up: int = 0
    cum_bytes_down: int = 0
    train_loss: float | None = None
    accuracy: float | None = None
    eval_loss: float | None = None
    wall_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    mode: str = "sync"  # "async": one line per model version (a buffer of K updates)
    clock_s: float = 0.0  # since the run (re)started; simulated time in simulated fleets
    staleness_mean: float | None = None  # async: of the accepted updates in this version
    staleness_max: int | None = None
    uplink: dict[str, dict[str, Any]] = field(default_factory=dict)  # device -> spec, bytes
    upload_budget_s: float | None = None  # adaptive uplink: the budget this round's specs fit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MetricsWriter:
    def __init__(self, path: str | Path | None, progress: TextIO | None = sys.stderr) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.progress = progress

    def write(self, m: RoundMetrics, total_rounds: int | None = None) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(m.to_dict()) + "\n")
                f.flush()
        if self.progress is not None:
            self.progress.write(format_progress(m, total_rounds) + "\n")
            self.progress.flush()


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_progress(m: RoundMetrics, total: int | None = None) -> str:
    acc = "  n/a " if m.accuracy is None else f"{100 * m.accuracy:5.1f}%"
    loss = "  n/a" if m.train_loss is None else f"{m.train_loss:.3f}"
    dropped = sum(m.dropped.values())
    why = ", ".join(f"{k}: {v}" for k, v in sorted(m.dropped.items()))
    of = f"/{total}" if total else ""
    return (
        f"round {m.round:3d}{of}  acc {acc}  loss {loss}  devices {m.participants}/{m.sampled}"
        f"  up {_bytes(m.bytes_up)} (total {_bytes(m.cum_bytes_up)})  down {_bytes(m.bytes_down)}"
        f"  {m.wall_seconds:.1f}s" + (f"  dropped {dropped} ({why})" if dropped else "")
    )


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
