"""Errors raised by the training-step exporter (all subclass :class:`TrainExportError`)."""

from __future__ import annotations


class TrainExportError(Exception):
    """Base class: the model cannot be exported as a correct ONNX training step."""


class UnsupportedOpError(TrainExportError):
    """An aten op has no ONNX translation; names the op and the layer it comes from."""

    def __init__(self, op: str, layer: str, detail: str = "") -> None:
        self.op = op
        self.layer = layer
        msg = f"unsupported op {op} in layer {layer!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class VerificationError(TrainExportError):
    """The exported ONNX step disagrees with torch autograd + torch.optim: never shipped."""
