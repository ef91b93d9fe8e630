"""A tiny ONNX node builder for the exporter's graph rewrites (nchwc.py, depthwise_grad.py),
and the NCHWc facts both rewrites build on.

Why not onnxscript: these rewrites splice nodes into an already exported ModelProto, next
to nodes they keep, and need unique names in that graph; building NodeProtos directly is
all they need.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Builder:
    """Collects nodes and constant initializers with names unique under ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{self.prefix}_{base}_{self._n}"

    def const(self, base: str, value: np.ndarray) -> str:
        t = numpy_helper.from_array(value, self.name(base))
        self.inits.append(t)
        return t.name

    def ints(self, base: str, values: list[int]) -> str:
        """An int64 1-D constant (shapes, pads, axes)."""
        return self.const(base, np.array(values, np.int64))

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out

    def node_to(
        self, op: str, inputs: list[str], output: str, domain: str = "", **attrs: object
    ) -> None:
        """A node writing a tensor name the rest of the graph already reads."""
        self.nodes.append(helper.make_node(op, inputs, [output], domain=domain, **attrs))


NCHWC_DOMAIN = "com.microsoft.nchwc"


def nchwc_block_size(b: Builder) -> str:
    """int64 [1] tensor holding the NCHWc block size (16 with AVX-512, 8 with AVX2), read
    inside the graph: ``Shape(ReorderInput(zeros[1, 4, 1, 1]))[1]``, so one graph serves
    every machine whose onnxruntime has the NCHWc kernels."""
    probe = b.const("probe", np.zeros((1, 4, 1, 1), np.float32))
    shape = b.node("Shape", [b.node("ReorderInput", [probe], NCHWC_DOMAIN)])
    return b.node("Slice", [shape, b.ints("one", [1]), b.ints("two", [2])])


def with_nodes(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph holds ``nodes`` (in that order) and, besides its own
    initializers, ``inits``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    return out


__all__ = ["NCHWC_DOMAIN", "Builder", "nchwc_block_size", "with_nodes"]
