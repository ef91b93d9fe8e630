"""The device agent's state on disk, written atomically so power loss leaves old or new.

Layout of ``state_dir``::

    state.json            device id, run id (and earlier runs), model version, last finished
                          round and its update id
    residual.ef           error-feedback residual (codec ``ErrorFeedback.save``, atomic)
    outbox.bin            the last update message, resent unchanged when its task is redelivered
    model.npz             the latest global weights received (what ``predict`` runs)
    graphs/<sha>/         step.onnx, manifest.json, inference.onnx of each graph received

Why keep the last update: a task redelivered after a crash must not train again (the
residual already moved on); resending the same bytes with the same update id lets the
coordinator drop the copy as a duplicate if the first one arrived.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.atomic import atomic_write

MAX_PAST_RUNS = 32


class AgentState:
    def __init__(self, directory: str | Path, device_id: str, durable: bool = True) -> None:
        self.durable = durable
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device_id = device_id
        self.model_version: str | None = None
        self.last_round = 0
        self.last_update_id: str | None = None
        self.rounds_done = 0
        # The coordinator's run the rounds above belong to: a task of another (new) run resets
        # the round counter and the error-feedback residual (see :meth:`start_run`).
        self.run_id: str | None = None
        self.past_runs: list[str] = []
        # A write killed mid-way leaves its temp file (".<name>.<random>.tmp" from edgefed.atomic,
        # ".residual.ef.<random>" from ErrorFeedback.save); repeated power loss would fill
        # the disk with them. One agent owns the directory, so clear them at start.
        for t in [*self.dir.glob("*.tmp"), *self.dir.glob(".residual.ef.*")]:
            t.unlink(missing_ok=True)
        p = self.dir / "state.json"
        if p.exists():
            try:
                d = json.loads(p.read_text())
                if d.get("device_id") != device_id:
                    raise ValueError(f"state in {self.dir} belongs to {d.get('device_id')!r}")
                self.model_version = d.get("model_version")
                self.last_round = int(d.get("last_round", 0))
                self.last_update_id = d.get("last_update_id")
                self.rounds_done = int(d.get("rounds_done", 0))
                self.run_id = d.get("run_id")
                self.past_runs = [str(r) for r in d.get("past_runs", [])][-MAX_PAST_RUNS:]
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"corrupt agent state {p}: {e}") from e

    @property
    def residual_path(self) -> Path:
        return self.dir / "residual.ef"

    def save(self) -> None:
        d = {
            "device_id": self.device_id,
            "model_version": self.model_version,
            "last_round": self.last_round,
            "last_update_id": self.last_update_id,
            "rounds_done": self.rounds_done,
            "run_id": self.run_id,
            "past_runs": self.past_runs,
        }
        atomic_write(self.dir / "state.json", json.dumps(d).encode(), self.durable)

    def start_run(self, run_id: str) -> None:
        """Follow a new coordinator run: its rounds count from 1 again and the residual of
        the old run (error feedback of another model trajectory) is dropped. The old run id
        is remembered so a replayed task of it is refused instead of followed back."""
        if self.run_id is not None and self.run_id not in self.past_runs:
            self.past_runs = [*self.past_runs, self.run_id][-MAX_PAST_RUNS:]
        self.run_id = run_id
        self.last_round, self.last_update_id = 0, None
        self.residual_path.unlink(missing_ok=True)
        (self.dir / "outbox.bin").unlink(missing_ok=True)
        self.save()

    # outbox: the last update sent
    def save_outbox(self, data: bytes) -> None:
        atomic_write(self.dir / "outbox.bin", data, self.durable)

    def load_outbox(self) -> bytes | None:
        p = self.dir / "outbox.bin"
        return p.read_bytes() if p.exists() else None

    # graphs
    def graph_dir(self, sha: str) -> Path:
        if not sha.isalnum():
            raise ValueError(f"bad graph id {sha!r}")
        return self.dir / "graphs" / sha

    def has_graph(self, sha: str) -> bool:
        return (self.graph_dir(sha) / "manifest.json").exists()

    def graphs(self) -> list[str]:
        g = self.dir / "graphs"
        if not g.exists():
            return []
        return sorted(p.name for p in g.iterdir() if (p / "manifest.json").exists())

    def save_graph(self, sha: str, step: bytes, manifest: bytes, inference: bytes) -> None:
        d = self.graph_dir(sha)
        atomic_write(d / "step.onnx", step, self.durable)
        atomic_write(d / "inference.onnx", inference, self.durable)
        atomic_write(d / "manifest.json", manifest, self.durable)  # last: marks the graph complete

    def load_graph(self, sha: str) -> tuple[bytes, dict[str, Any], bytes]:
        d = self.graph_dir(sha)
        return (
            (d / "step.onnx").read_bytes(),
            json.loads((d / "manifest.json").read_text()),
            (d / "inference.onnx").read_bytes(),
        )

    # deployed model
    def save_model(self, params: dict[str, np.ndarray], graph_sha: str, version: str) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **params)
        atomic_write(self.dir / "model.npz", buf.getvalue(), self.durable)
        atomic_write(
            self.dir / "model.json",
            json.dumps({"graph": graph_sha, "version": version}).encode(),
            self.durable,
        )

    def load_model(self) -> tuple[dict[str, np.ndarray], str, str]:
        info = json.loads((self.dir / "model.json").read_text())
        with np.load(self.dir / "model.npz", allow_pickle=False) as z:
            params = {k: z[k] for k in z.files}
        return params, info["graph"], info["version"]
