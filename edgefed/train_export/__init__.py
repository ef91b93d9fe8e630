"""Export training steps of PyTorch models to plain ONNX (coordinator side; needs torch).

The device runs the result with :class:`device_agent.trainer.StepTrainer` (no torch).
"""

from .errors import TrainExportError, UnsupportedOpError, VerificationError
from .export import StepGraph, export_training_step
from .optimizers import SGD, Adam

__all__ = [
    "SGD",
    "Adam",
    "StepGraph",
    "TrainExportError",
    "UnsupportedOpError",
    "VerificationError",
    "export_training_step",
]
