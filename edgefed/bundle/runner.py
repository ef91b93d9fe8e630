"""Running an installed bundle's model on a device's own data (torch-free).

Why a module of its own: the device checks a bundle's input signature against its data
contract before installing it, evaluates it on held-out data during a canary roll-out, and
``edgefed-agent predict`` runs it - three callers that must agree on what "this input fits
this model" means, and that must say so in one clear line instead of an onnxruntime
traceback.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefed.bundle.format import BundleError, Manifest, TensorSpec


@dataclass(frozen=True)
class InputContract:
    """Per-sample shape and dtype of the data a device holds (its data file's ``x``)."""

    shape: tuple[int, ...]
    dtype: str

    @staticmethod
    def of(x: np.ndarray) -> InputContract:
        return InputContract(tuple(int(d) for d in x.shape[1:]), str(np.asarray(x).dtype))

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def describe_input(spec: TensorSpec) -> str:
    return f"{spec.dtype}{list(spec.shape[1:])}"


def check_input(manifest: Manifest, contract: InputContract, where: str = "the data") -> None:
    """Raise BundleError unless the bundle takes one input whose per-sample shape and dtype
    are ``contract``'s (a symbolic dimension accepts any size)."""
    if len(manifest.inputs) != 1:
        names = [s.name for s in manifest.inputs]
        raise BundleError(f"bundle takes {len(names)} inputs {names}; the device feeds one")
    spec = manifest.inputs[0]
    dims = spec.shape[1:]
    fits = len(dims) == len(contract.shape) and all(
        isinstance(d, str) or d == c for d, c in zip(dims, contract.shape, strict=True)
    )
    if not fits or spec.dtype != contract.dtype:
        raise BundleError(
            f"input mismatch: bundle {manifest.model_version} expects per-sample "
            f"{describe_input(spec)} (input {spec.name!r}), {where} is {contract.describe()}"
        )


class BundleModel:
    """One onnxruntime session (1 thread, CPU) on an installed bundle's model."""

    def __init__(self, model_path: str | Path, manifest: Manifest) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.manifest = manifest
        try:
            self.session = ort.InferenceSession(
                str(model_path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises several unrelated types
            raise BundleError(f"model does not load in onnxruntime: {e}") from None
        self.input = manifest.inputs[0]

    def predict(
        self, x: np.ndarray, batch_size: int = 1024, where: str = "the input"
    ) -> np.ndarray:
        """First output for ``x`` (checked against the input signature first)."""
        x = np.asarray(x)
        check_input(self.manifest, InputContract.of(x), where)
        outs = []
        for i in range(0, len(x), batch_size):
            batch = np.ascontiguousarray(x[i : i + batch_size])
            try:
                outs.append(np.asarray(self.session.run(None, {self.input.name: batch})[0]))
            except Exception as e:  # a shape the signature admits but the graph refuses
                raise BundleError(f"model failed on {where}: {str(e).splitlines()[0]}") from None
        return np.concatenate(outs) if outs else np.empty((0,), np.float32)


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a classifier's logits."""
    logits = predict(x)
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(y)).mean())


def latency_ms(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, runs: int = 30) -> float:
    """Median batch-1 latency of ``predict`` on the first sample of ``x``."""
    one = np.ascontiguousarray(x[:1])
    predict(one)  # warm-up: first run allocates
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predict(one)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)
