"""Inference with onnxruntime on the exported inference graph (no torch).

The exporter's inference graph takes the model's tensors as inputs (``param:``, ``frozen:``,
``buffer:`` roles in the manifest), so one graph serves every model version: the device
feeds the latest global weights it received.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort


class InferenceModel:
    def __init__(self, onnx_bytes: bytes, manifest: dict[str, Any], threads: int = 1) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        inputs = manifest.get("inference", {}).get("inputs")
        if not isinstance(inputs, list):
            raise ValueError("manifest has no inference inputs")
        self.keys: dict[str, str] = {}  # ONNX input name -> tensor name
        for e in inputs:
            if e.get("role") != "x":
                self.keys[e["name"]] = e["key"]
        self.x_name = next(e["name"] for e in inputs if e.get("role") == "x")
        xe = next(e for e in inputs if e.get("role") == "x")
        self.x_dtype = np.dtype(xe.get("dtype", "float32"))
        self.x_shape = tuple(xe.get("shape", [])[1:])  # per-sample shape

    def predict(
        self, x: np.ndarray, params: dict[str, np.ndarray], batch_size: int = 1024
    ) -> np.ndarray:
        """Model outputs (logits) for ``x``; missing tensors raise KeyError naming them."""
        missing = [k for k in self.keys.values() if k not in params]
        if missing:
            raise KeyError(f"weights lack tensors {missing}")
        feeds = {n: np.ascontiguousarray(params[k], np.float32) for n, k in self.keys.items()}
        outs = []
        x = np.asarray(x, dtype=self.x_dtype)
        if self.x_shape and tuple(x.shape[1:]) != tuple(int(d) for d in self.x_shape):
            raise ValueError(f"input per-sample shape {x.shape[1:]} != model's {self.x_shape}")
        for i in range(0, len(x), batch_size):
            feeds[self.x_name] = np.ascontiguousarray(x[i : i + batch_size])
            outs.append(self.session.run(None, feeds)[0])
        return np.concatenate(outs) if outs else np.empty((0,), np.float32)

    def evaluate(
        self, x: np.ndarray, y: np.ndarray, params: dict[str, np.ndarray]
    ) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of a classifier on (x, y)."""
        logits = self.predict(x, params).astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        y = np.asarray(y, dtype=np.int64)
        loss = float(-logp[np.arange(len(y)), y].mean())
        return float((logits.argmax(axis=1) == y).mean()), loss
