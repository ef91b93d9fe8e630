"""ONNX export, validation and measurement of one candidate model.

Latency: onnxruntime CPU session with a FIXED intra-op thread count (inter-op 1,
sequential), warm-up runs, then the median of timed runs of one fixed batch. Accuracy is
measured on the ONNX model itself (what ships), not on the torch module.
"""

from __future__ import annotations

import io
import statistics
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

INPUT_NAME = "x"
OUTPUT_NAME = "logits"
OPSET = 18


def strip_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop per-node metadata and doc strings the dynamo exporter adds (stack traces, ~14 KB)."""

    def clean(graph: onnx.GraphProto) -> None:
        graph.doc_string = ""
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            del vi.metadata_props[:]
            vi.doc_string = ""
        for init in graph.initializer:
            del init.metadata_props[:]
        del graph.metadata_props[:]

    clean(model.graph)
    del model.metadata_props[:]
    model.doc_string = ""
    return model


def export_onnx(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """Dynamo export with a dynamic batch axis, no external data, metadata stripped, checked.

    The example batch must be >= 2: a batch of 1 gets specialised even when declared dynamic.
    """
    if example.shape[0] < 2:
        raise ValueError("export needs an example batch of at least 2 for a dynamic batch axis")
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            # positional (a tuple, not a dict keyed by the forward's argument name): any
            # module works, nn.Sequential's ``input`` and a user's ``forward(self, x)`` alike
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},),
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = strip_metadata(prog.model_proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def session(model_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def run_batched(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def accuracy(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_batched(sess, x).argmax(1) == y).mean())


def latency_ms(
    sess: ort.InferenceSession, sample: np.ndarray, batch: int, runs: int = 50, warmup: int = 5
) -> float:
    """Median wall time of one ``sess.run`` on ``batch`` copies of ``sample``."""
    name = sess.get_inputs()[0].name
    xb = np.ascontiguousarray(np.repeat(sample[None], batch, axis=0))
    for _ in range(warmup):
        sess.run(None, {name: xb})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: xb})
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


@torch.no_grad()
def parity(model: nn.Module, model_bytes: bytes, x: np.ndarray) -> float:
    """Max |ORT - torch| on ``x`` (float stages only; int8 differs by design)."""
    model.eval()
    ref = model(torch.from_numpy(x)).numpy()
    got = session(model_bytes).run(None, {INPUT_NAME: x})[0]
    return float(np.abs(ref - got).max())


def onnx_bytes_to_buffer(model_bytes: bytes) -> io.BytesIO:
    return io.BytesIO(model_bytes)
