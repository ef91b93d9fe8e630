"""The message that delivers the run's final model to the devices (issue 14).

Devices store the global weights that come with each task, so without this message they
would keep the model of the last round's START and never see the result of the run. It
travels on each device's task topic (the one topic a device reads, signed like a task) with
``type = "model"``; the agent stores it as its deployed model and does not train.
"""

from __future__ import annotations

import json
from typing import Any

from edgefed.codec import CompressionSpec, UpdateMeta, encode_update
from edgefed.transport.message import pack


def final_model_message(engine: Any, device: str) -> bytes:
    """The final model for ``device`` (its graph included when it may lack it)."""
    gid = engine.graph_for(device)
    g = engine.model.graphs[gid]
    meta = UpdateMeta(engine.round, "coordinator", 0, engine.model_version, kind="weights")
    weights = encode_update(engine.params, meta, CompressionSpec.parse(engine.cfg.downlink))
    header = {
        "type": "model",
        "run_id": engine.run_id,
        "round": engine.round,
        "model_version": engine.model_version,
        "graph_id": gid,
        "graph_sha": g.sha,
        "schema": {k: list(v) for k, v in engine.model.shapes.items()},
    }
    parts = {"weights": weights}
    if g.sha not in engine.device(device).graphs:
        parts["graph"] = g.onnx
        parts["manifest"] = json.dumps(g.manifest).encode()
        parts["inference"] = g.inference_onnx
    return pack(header, parts)
