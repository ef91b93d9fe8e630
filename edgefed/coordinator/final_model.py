"""The message that delivers the run's final model to the devices (issue 14).

Devices store the global weights that come with each task, so without this message they
would keep the model of the last round's START and never see the result of the run. It
travels on each device's task topic (the one topic a device reads, signed like a task) with
``type = "model"``; the agent stores it as its deployed model and does not train.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgefed.codec import CompressionSpec, UpdateMeta, encode_update
from edgefed.coordinator.tasks import graph_parts
from edgefed.protocol import ModelHeader, pack


def final_model_messages(engine: Any) -> Iterator[tuple[str, bytes]]:
    """(device, message) for every device the engine knows: the weights are encoded once and
    shared; a device's graph travels along only when it may lack it."""
    rnd = engine.downlink_seq  # above every task round the devices saw (async: task_seq)
    meta = UpdateMeta(rnd, "coordinator", 0, engine.model_version, kind="weights")
    weights = encode_update(engine.params, meta, CompressionSpec.parse(engine.cfg.downlink))
    schema = {k: list(v) for k, v in engine.model.shapes.items()}
    for device in sorted(engine.devices):
        gid = engine.graph_for(device)
        g = engine.model.graphs[gid]
        header = ModelHeader(rnd, engine.model_version, gid, g.sha, schema, engine.run_id)
        parts = {"weights": weights}
        if g.sha not in engine.device(device).graphs:
            parts.update(graph_parts(g))
        yield device, pack(header.to_dict(), parts)
