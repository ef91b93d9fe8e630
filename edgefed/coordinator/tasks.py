"""A round's tasks: :func:`build_tasks` decides them, :class:`LazyTasks` holds them as a
read-only mapping whose messages are built when read.

``start_round`` decides everything eagerly (sample, seeds, which devices get the graph, byte
counts) so the round is deterministic and accounted for; only joining (and signing) each
device's bytes waits until the service publishes it. Peak memory then holds one task at a
time instead of one per sampled device (1 byte per parameter each with int8 weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from edgefed.codec import CompressionSpec, UpdateMeta, encode_update
from edgefed.protocol import PackedMessage, TaskHeader


class LazyTasks(Mapping[str, bytes]):
    def __init__(self, builders: Mapping[str, Callable[[], bytes]], nbytes: int = 0) -> None:
        self._builders = dict(builders)
        self.bytes = nbytes  # the tasks' total size (known before they are joined)

    def __getitem__(self, device: str) -> bytes:
        return self._builders[device]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def update(self, other: LazyTasks) -> None:
        """Add (or replace) devices' tasks: asynchronous mode keeps each device's latest."""
        self._builders.update(other._builders)

    def map(self, fn: Callable[[str, bytes], bytes]) -> LazyTasks:
        """Tasks transformed per device on read (e.g. signed for their topic)."""
        return LazyTasks({d: (lambda d=d: fn(d, self[d])) for d in self._builders}, self.bytes)


def graph_parts(graph: Any) -> dict[str, bytes]:
    """The message parts that install a graph (step, manifest, inference) on a device."""
    return {
        "graph": graph.onnx,
        "manifest": json.dumps(graph.manifest).encode(),
        "inference": graph.inference_onnx,
    }


def build_tasks(
    rnd: int,
    model_version: str,
    model: Any,  # coordinator.model.FederatedModel
    params: Mapping[str, Any],
    cfg: Any,  # coordinator.rounds.RoundConfig
    strategy_hyper: Mapping[str, Any],
    assignment: Mapping[str, str],  # device -> graph id
    devices: Mapping[str, Any],  # device -> DeviceStats (its ``graphs`` are updated)
    seed: Callable[[], int],
    run_id: str | None = None,
    uplinks: Mapping[str, str] | None = None,  # device -> its update spec (adaptive)
    with_graph: Collection[str] | None = None,  # devices sent the graph (None: who lacks it)
) -> LazyTasks:
    """Every sampled device's task: the global weights (encoded once, shared), its graph's
    header and, only when the device does not hold that graph yet, the graph itself.

    ``with_graph`` fixes who gets the graph instead: a restarted asynchronous coordinator
    re-sending a journaled task rebuilds it byte for byte (coordinator/journal.py), so it
    must repeat the original decision, not take a new one from what it knows now."""
    meta = UpdateMeta(rnd, "coordinator", 0, model_version, kind="weights")
    weights = encode_update(dict(params), meta, CompressionSpec.parse(cfg.downlink))
    hyper = {"epochs": cfg.local_epochs, "batch_size": cfg.batch_size, "lr": cfg.lr}
    hyper.update(strategy_hyper)
    schema = {k: list(v) for k, v in model.shapes.items()}
    tasks: dict[str, PackedMessage] = {}
    for d, gid in assignment.items():
        g = model.graphs[gid]
        st = devices[d]
        header = TaskHeader(
            rnd, model_version, gid, g.sha, {**hyper, "seed": seed()},
            (uplinks or {}).get(d, cfg.uplink), schema,
            cfg.error_feedback, cfg.round_timeout, run_id,
        )  # fmt: skip
        parts = {"weights": weights}
        lacks = g.sha not in st.graphs if with_graph is None else d in with_graph
        if lacks:  # the step graph only when the device lacks it
            parts.update(graph_parts(g))
            st.graphs = [*st.graphs, g.sha][-16:]
        tasks[d] = PackedMessage(header.to_dict(), parts)
    return LazyTasks({d: m.to_bytes for d, m in tasks.items()}, sum(map(len, tasks.values())))


__all__ = ["LazyTasks", "build_tasks", "graph_parts"]
