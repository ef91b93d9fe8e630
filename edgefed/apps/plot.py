"""PNG plots of federated runs: accuracy vs round and vs cumulative uplink bytes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str = ""
) -> Path:
    """``runs``: label -> per-round metric dicts (``round``, ``accuracy``, ``cum_bytes_up``)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless coordinator
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, hist in runs.items():
        pts = [h for h in hist if h.get("accuracy") is not None]
        if not pts:
            continue
        acc = [100 * h["accuracy"] for h in pts]
        a1.plot([h["round"] for h in pts], acc, label=label)
        a2.plot([max(h["cum_bytes_up"], 1) for h in pts], acc, label=label)
    a1.set_xlabel("round")
    a2.set_xlabel("cumulative uplink bytes")
    a2.set_xscale("log")
    for a in (a1, a2):
        a.set_ylabel("held-out accuracy (%)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
