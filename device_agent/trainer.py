"""Run an exported training step (see edgefed.train_export) with plain onnxruntime. No torch.

The session is created once. Parameters, optimizer state and BatchNorm statistics live in two
sets of numpy buffers wrapped by OrtValues (no copies): each step binds set A as inputs and set
B as outputs through io_binding, then the sets swap. Inputs are validated against the manifest
(names, dtypes, shapes, finiteness) before anything runs, with errors that name the tensor.

This module needs nothing from ``edgefed._core``: numpy + onnxruntime only.

Kernel dispatch (one point, a reference path always there, like MLAS): an exported step may
carry an alternative graph in its metadata (``edgefed.alt.nchwc``: depthwise and k x k
convolutions on onnxruntime's NCHWc kernels, MobileNet-style step 168 -> 118 ms; see
edgefed/train_export/nchwc.py). The trainer loads it, runs it ONCE against the default graph
on the first samples of the first batch (same loss and outputs within a tolerance) and uses
it from then on; when the alternative does not load (an onnxruntime build without NCHWc),
fails to run or disagrees, it logs why and trains with the default-domain graph.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .dataset import DatasetError, batch_order, load_npz

FORMAT = "edgefed.train_step/1"
ALT_KEY = "edgefed.alt.nchwc"  # metadata entry of the NCHWc alternative (train_export.nchwc)
# One-batch check of the alternative: |alt - default| <= ATOL + RTOL * |default| everywhere
# (summation order differs; a wrong kernel or layout is off by O(1)).
ALT_RTOL, ALT_ATOL = 1e-3, 1e-4
ALT_CHECK_SAMPLES = 4  # samples of the first batch the check runs on (memory, see below)
# The alternative is the step graph with a few nodes swapped, so it cannot be much larger than
# the step that carries it: inflating stops at twice the carrier plus 1 MiB, so a hostile or
# corrupt stream cannot make the device allocate more than that (zlib bombs inflate ~1000x).
ALT_SLACK_BYTES = 1 << 20
log = logging.getLogger(__name__)
_PERSISTENT = ("param", "frozen", "buffer", "state", "step")
_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "float64": np.float64}


class TrainerError(ValueError):
    """Bad step graph, manifest, parameters or data for the trainer."""


@dataclass
class TrainStats:
    """What one ``train_epochs`` call did (loss is the sample-weighted mean per epoch)."""

    steps: int = 0
    samples: int = 0
    epoch_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the call, an emulated step time included
    emulated_s: float = 0.0  # of which slept to emulate ``step_s`` (fleet emulation)

    @property
    def loss(self) -> float:
        return self.epoch_loss[-1] if self.epoch_loss else float("nan")


def _read_bytes(obj: bytes | str | Path) -> bytes:
    return obj if isinstance(obj, bytes) else Path(obj).read_bytes()


def _read_manifest(obj: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    try:
        return json.loads(Path(obj).read_text())
    except (OSError, ValueError) as e:
        raise TrainerError(f"manifest {obj}: unreadable: {e}") from e


def _session(data: bytes, threads: int, low_memory: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    # No pre-planned memory pattern: it reserves one block for every intermediate tensor of
    # the step at once; without it the arena reuses freed chunks. MobileNet-style step at
    # batch 32: peak RSS 160 -> 122 MB, step time within noise (151 vs 154 ms interleaved).
    so.enable_mem_pattern = False
    if low_memory:  # no arena either: lower peak RSS still, allocations per run
        so.enable_cpu_mem_arena = False
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # Workers spin between the nodes of one step (waking a sleeping worker per node cost
    # 3-5% of a 2-thread CNN step) but stop when run() returns: on a device the agent
    # shares the cores with MQTT and the OS, and workers left spinning after a run slowed
    # whatever ran next (seen in the benchmarks).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TrainerError(f"onnxruntime cannot load the graph: {e}") from e


def _unpack(encoded: str, limit: int) -> bytes:
    """base64 + zlib, as edgefed.train_export.nchwc.embed writes it; at most ``limit`` bytes."""
    d = zlib.decompressobj()
    raw = d.decompress(base64.b64decode(encoded, validate=True), limit)
    if d.unconsumed_tail or not d.eof:
        raise ValueError(f"the alternative graph is truncated or larger than {limit} B")
    return raw


def _np_dtype(name: str) -> np.dtype[Any]:
    if name not in _DTYPES:
        raise TrainerError(f"manifest dtype {name!r} not supported")
    return np.dtype(_DTYPES[name])


class StepTrainer:
    """Trains on local data by running the exported step graph in onnxruntime."""

    def __init__(
        self,
        step_onnx: bytes | str | Path,
        manifest: Mapping[str, Any] | str | Path,
        threads: int = 1,
        inference_onnx: bytes | str | Path | None = None,
        low_memory: bool = False,
        alternative: bool = True,
    ) -> None:
        """``alternative``: use the step's embedded NCHWc variant when it loads and passes
        the one-batch check (see the module docstring); False: the default graph only."""
        if threads < 1:
            raise TrainerError(f"threads must be >= 1, got {threads}")
        self.manifest = _read_manifest(manifest)
        if self.manifest.get("format") != FORMAT:
            raise TrainerError(f"manifest format {self.manifest.get('format')!r} != {FORMAT!r}")
        self.threads = threads
        self._step_bytes = _read_bytes(step_onnx)
        self._low_memory = low_memory
        self._sess = _session(self._step_bytes, threads, low_memory)
        self.kernel_path = "default"  # which graph trains: "default" or "nchwc"
        self.dispatch_note = "no alternative graph in the step"
        self._inf_bytes = _read_bytes(inference_onnx) if inference_onnx is not None else None
        self._inf_sess: ort.InferenceSession | None = None
        self._in = {e["name"]: e for e in self.manifest["inputs"]}
        self._out = {e["name"]: e for e in self.manifest["outputs"]}
        sess_in = [i.name for i in self._sess.get_inputs()]
        sess_out = [o.name for o in self._sess.get_outputs()]
        if sess_in != list(self._in) or sess_out != list(self._out):
            raise TrainerError("step graph inputs/outputs do not match the manifest")
        self._by_role: dict[str, list[dict[str, Any]]] = {}
        for e in self.manifest["inputs"]:
            self._by_role.setdefault(e["role"], []).append(e)
        # Two buffer sets for everything the step rewrites, one for what it only reads.
        self._cur: dict[str, np.ndarray] = {}
        self._nxt: dict[str, np.ndarray] = {}
        self._ov_cur: dict[str, ort.OrtValue] = {}
        self._ov_nxt: dict[str, ort.OrtValue] = {}
        fed = {e["feeds"] for e in self.manifest["outputs"] if "feeds" in e}
        for name, e in self._in.items():
            if e["role"] in _PERSISTENT or e["role"] == "global":
                shape = tuple(int(s) for s in e["shape"])
                self._cur[name] = np.zeros(shape, _np_dtype(e["dtype"]))
                self._ov_cur[name] = ort.OrtValue.ortvalue_from_numpy(self._cur[name])
                if name in fed:
                    self._nxt[name] = np.zeros(shape, _np_dtype(e["dtype"]))
                    self._ov_nxt[name] = ort.OrtValue.ortvalue_from_numpy(self._nxt[name])
        self._loss = np.zeros((), np.float32)
        self._ov_loss = ort.OrtValue.ortvalue_from_numpy(self._loss)
        self._scalars = {k: np.zeros((), np.float32) for k in ("lr", "mu", "adam_eps")}
        eps = self.manifest["optimizer"].get("eps")
        if eps is not None:
            self._scalars["adam_eps"][()] = eps
        self._binding = self._sess.io_binding()
        self._alt: ort.InferenceSession | None = None
        if alternative:
            self._alt = self._load_alternative(sess_in, sess_out)
        self._param_keys = {
            e["key"]: e["name"]
            for e in self.manifest["inputs"]
            if e["role"] in ("param", "frozen", "buffer")
        }
        self._x = self._in["x"]
        self._y = self._in["y"]

    # ----- kernel dispatch -------------------------------------------------------------------
    def _load_alternative(
        self, sess_in: list[str], sess_out: list[str]
    ) -> ort.InferenceSession | None:
        encoded = self._sess.get_modelmeta().custom_metadata_map.get(ALT_KEY)
        if encoded is None:
            return None
        try:
            limit = 2 * len(self._step_bytes) + ALT_SLACK_BYTES
            alt = _session(_unpack(encoded, limit), self.threads, self._low_memory)
        except (TrainerError, binascii.Error, zlib.error, ValueError) as e:
            return self._fallback(f"the NCHWc alternative does not load: {e}")
        if [i.name for i in alt.get_inputs()] != sess_in or [
            o.name for o in alt.get_outputs()
        ] != sess_out:
            return self._fallback("the NCHWc alternative's inputs/outputs differ from the step's")
        self.dispatch_note = "NCHWc alternative loaded; to be checked on the first batch"
        return alt

    def _fallback(self, why: str) -> None:
        self.kernel_path, self.dispatch_note = "default", f"{why}: training with the default graph"
        log.warning("%s", self.dispatch_note)
        return None

    def _back_to_default(self, why: str) -> None:
        """Fall back after the default session was released: build it again."""
        self._fallback(why)
        self._sess = _session(self._step_bytes, self.threads, self._low_memory)
        self._binding = self._sess.io_binding()

    def _check_alternative(self, feed: dict[str, Any]) -> None:
        """Run the default graph and the alternative on the first samples of one batch; keep
        the alternative if it agrees, else rebuild the default session (NaN counts as a
        disagreement: the default graph then reports it as usual)."""
        alt, self._alt = self._alt, None
        assert alt is not None
        names = [o.name for o in self._sess.get_outputs()]
        ref = self._sess.run(None, feed)
        # The released default session's memory stays in the process heap: checked on
        # the first ALT_CHECK_SAMPLES samples of the batch, its arena stays small
        # (MobileNet-style step, batch 32: peak RSS 174 MB checking the whole batch,
        # default graph alone 124 MB; the target is < 150 MB).
        del self._binding
        self._sess = self._binding = None  # type: ignore[assignment]
        try:
            got = alt.run(None, feed)
            why = next(
                (
                    f"the NCHWc alternative disagrees with the default graph on {name}"
                    for name, a, b in zip(names, got, ref, strict=True)
                    if np.shape(a) != np.shape(b)
                    or not np.all(np.abs(a - b) <= ALT_ATOL + ALT_RTOL * np.abs(b))
                ),
                None,
            )
        except Exception as e:  # an onnxruntime run failure of the alternative: fall back
            why = f"the NCHWc alternative failed on the first batch: {e}"
        if why is not None:
            del alt
            self._back_to_default(why)
            return
        self._sess, self._binding = alt, alt.io_binding()
        self.kernel_path = "nchwc"
        self.dispatch_note = "NCHWc alternative agrees with the default graph on the first batch"
        log.info("%s", self.dispatch_note)

    # ----- parameters and state -------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        """Names settable/readable through params (baked constants excluded)."""
        return list(self._param_keys)

    def set_params(self, params: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Copy parameters in (validated first; nothing changes if any tensor is bad).

        ``strict``: every graph parameter must be given. Baked (constant) tensors may be given
        too: they are checked against the sha256 recorded at export, never silently ignored.
        """
        baked = self.manifest.get("baked", {})
        ignored = set(self.manifest.get("ignored_buffers", []))  # e.g. num_batches_tracked
        params = {k: v for k, v in params.items() if k not in ignored}
        unknown = [k for k in params if k not in self._param_keys and k not in baked]
        if unknown:
            raise TrainerError(f"unknown parameter names: {unknown[:5]}")
        missing = [k for k in self._param_keys if k not in params]
        if strict and missing:
            raise TrainerError(f"missing parameters: {missing[:5]}")
        staged: list[tuple[str, np.ndarray]] = []
        for k, v in params.items():
            a = np.asarray(v)
            if k in baked:
                b = baked[k]
                if (
                    list(a.shape) != b["shape"]
                    or hashlib.sha256(
                        np.ascontiguousarray(a, dtype=_np_dtype(b["dtype"])).tobytes()
                    ).hexdigest()
                    != b["sha256"]
                ):
                    raise TrainerError(
                        f"parameter {k!r} differs from the value baked into the step graph "
                        "(export again with the new backbone, or export with bake_frozen=False)"
                    )
                continue
            staged.append((self._param_keys[k], self._checked(self._param_keys[k], a)))
        for name, a in staged:
            np.copyto(self._cur[name], a)

    def _checked(self, name: str, a: np.ndarray) -> np.ndarray:
        e = self._in[name]
        want = tuple(int(s) for s in e["shape"])
        if a.shape != want:
            raise TrainerError(f"{e['key'] or name}: shape {a.shape} != expected {want}")
        if a.dtype != _np_dtype(e["dtype"]):
            if a.dtype.kind == "f" and e["dtype"].startswith("float"):
                a = a.astype(_np_dtype(e["dtype"]))
            else:
                raise TrainerError(f"{e['key'] or name}: dtype {a.dtype} != {e['dtype']}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise TrainerError(f"{e['key'] or name}: contains NaN or inf")
        return a

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Current parameters and statistics (copies: the live buffers swap every step)."""
        return {k: self._cur[n].copy() for k, n in self._param_keys.items()}

    @property
    def optimizer_state(self) -> dict[str, np.ndarray]:
        return {
            e["name"]: self._cur[e["name"]].copy()
            for e in self.manifest["inputs"]
            if e["role"] in ("state", "step")
        }

    def reset_optimizer_state(self) -> None:
        """Zero momentum / Adam moments and the step counter (a fresh optimizer)."""
        for e in self.manifest["inputs"]:
            if e["role"] in ("state", "step"):
                self._cur[e["name"]].fill(0)

    # ----- training -------------------------------------------------------------------------
    def _check_data(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for arr, e in ((x, self._x), (y, self._y)):
            a = np.asarray(arr)
            want_dtype = _np_dtype(e["dtype"])
            if a.dtype != want_dtype:
                same_kind = (a.dtype.kind == "f" and want_dtype.kind == "f") or (
                    a.dtype.kind in "iu" and want_dtype.kind == "i"
                )
                if not same_kind:
                    raise TrainerError(f"{e['name']}: dtype {a.dtype} != {e['dtype']}")
                a = a.astype(want_dtype)
            want = tuple(int(s) for s in e["shape"][1:])
            if a.ndim != len(e["shape"]) or a.shape[1:] != want:
                raise TrainerError(f"{e['name']}: per-sample shape {a.shape[1:]} != {want}")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise TrainerError(f"{e['name']}: contains NaN or inf")
            out.append(a)
        if out[0].shape[0] != out[1].shape[0] or out[0].shape[0] == 0:
            raise TrainerError(f"x has {out[0].shape[0]} samples, y has {out[1].shape[0]}")
        classes = self.manifest.get("num_classes")
        if classes is not None and out[1].size and (out[1].min() < 0 or out[1].max() >= classes):
            raise TrainerError(f"y: class ids must be in [0, {classes})")
        return out[0], out[1]

    def train_epochs(
        self,
        x: np.ndarray | str | Path,
        y: np.ndarray | None = None,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.05,
        seed: int = 0,
        global_params: Mapping[str, np.ndarray] | None = None,
        shuffle: bool = True,
        mu: float = 0.01,
        step_s: float = 0.0,
    ) -> TrainStats:
        """Run ``epochs`` over (x, y) (or an .npz path holding 'x' and 'y').

        ``step_s`` (fleet emulation, ``[agent] emulate_step_s``): the call lasts at least
        steps x ``step_s``, sleeping after the real steps for what they did not take, so
        this process trains like a device whose step takes ``step_s`` while its CPU idles
        (ten emulated devices on two cores computing for real would slow each other down,
        unevenly). Like ``edgefed.simulate(step_time=...)``, and proportional to the steps
        (data, epochs). Why not a multiple of the measured step: a step here is ~0.2 ms of
        CPU that varies 2-5x with cache state and host load (measured), and a multiplier
        of ~1000 turned that into seconds of noise per round.

        FedProx graphs: ``global_params`` is w_global (defaults to the parameters at the start
        of this call, i.e. the round's global model) and ``mu`` the proximal weight.
        """
        if isinstance(x, (str, Path)):
            if y is not None:
                raise TrainerError("pass either an .npz path or arrays (x, y)")
            x, y = load_npz(x)
        if y is None:
            raise TrainerError("y is required with array input")
        x, y = self._check_data(x, y)
        if not (np.isfinite(lr) and lr >= 0) or not (np.isfinite(mu) and mu >= 0):
            raise TrainerError(f"lr and mu must be finite and >= 0 (got {lr}, {mu})")
        self._scalars["lr"][()] = lr
        self._scalars["mu"][()] = mu
        if self.manifest.get("fedprox"):
            src = global_params if global_params is not None else self.params
            staged = []
            for e in self._by_role.get("global", []):
                if e["key"] not in src:
                    raise TrainerError(f"global_params lacks {e['key']!r}")
                staged.append((e["name"], self._checked(e["name"], np.asarray(src[e["key"]]))))
            for name, a in staged:
                np.copyto(self._cur[name], a)
        elif global_params is not None:
            raise TrainerError(
                "global_params given but the step graph was exported without FedProx"
            )
        stats = TrainStats()
        t0 = time.perf_counter()
        epoch_sum, epoch_n, current = 0.0, 0, 0
        # One snapshot per call (not per step): a diverging run restores the round's start.
        snapshot = {k: v.copy() for k, v in self._cur.items() if k in self._nxt}
        try:
            for epoch, idx in batch_order(len(x), epochs, batch_size, seed, shuffle):
                if epoch != current:
                    stats.epoch_loss.append(epoch_sum / max(epoch_n, 1))
                    epoch_sum, epoch_n, current = 0.0, 0, epoch
                loss = self._step(np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx]))
                epoch_sum += loss * len(idx)
                epoch_n += len(idx)
                stats.steps += 1
                stats.samples += len(idx)
            bad = [k for k in snapshot if not np.isfinite(self._cur[k]).all()]
            if bad:
                raise TrainerError(f"training diverged: {bad[0]} is not finite")
        except (TrainerError, DatasetError) as e:
            for k, v in snapshot.items():
                np.copyto(self._cur[k], v)
            raise TrainerError(
                f"{e}; parameters and state restored to the start of the call"
            ) from e
        if epoch_n:
            stats.epoch_loss.append(epoch_sum / epoch_n)
        if step_s > 0:
            stats.emulated_s = max(0.0, stats.steps * step_s - (time.perf_counter() - t0))
            time.sleep(stats.emulated_s)
        stats.seconds = time.perf_counter() - t0
        return stats

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One validated optimizer step on one batch; returns its loss."""
        x, y = self._check_data(x, y)
        self._scalars["lr"][()] = lr
        return self._step(np.ascontiguousarray(x), np.ascontiguousarray(y))

    def _step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        if self._alt is not None:  # first batch: decide which graph trains (once)
            k = min(len(xb), ALT_CHECK_SAMPLES)
            feed: dict[str, Any] = {"x": xb[:k], "y": yb[:k], **self._cur}
            feed.update({r: self._scalars[r] for r in ("lr", "mu", "adam_eps") if r in self._in})
            self._check_alternative(feed)
        b = self._binding
        b.bind_cpu_input("x", xb)
        b.bind_cpu_input("y", yb)
        for role in ("lr", "mu", "adam_eps"):
            if role in self._in:
                b.bind_cpu_input(role, self._scalars[role])
        for name, ov in self._ov_cur.items():
            b.bind_ortvalue_input(name, ov)
        b.bind_ortvalue_output("loss", self._ov_loss)
        for oname, e in self._out.items():
            if "feeds" in e:
                b.bind_ortvalue_output(oname, self._ov_nxt[e["feeds"]])
        try:
            self._sess.run_with_iobinding(b)
        except Exception as e:
            if self.kernel_path != "nchwc":
                raise
            # the reference path is always there: rebuild it and run this step again
            self._back_to_default(f"the NCHWc alternative failed during training: {e}")
            return self._step(xb, yb)
        loss = float(self._loss)
        if not np.isfinite(loss):
            # Not swapping keeps the parameters and state from before this step intact.
            raise TrainerError(f"loss became {loss}: step discarded (learning rate too high?)")
        for name in self._nxt:  # swap: outputs of this step are the inputs of the next
            self._cur[name], self._nxt[name] = self._nxt[name], self._cur[name]
            self._ov_cur[name], self._ov_nxt[name] = self._ov_nxt[name], self._ov_cur[name]
        return loss

    # ----- inference ------------------------------------------------------------------------
    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Eval-mode outputs (e.g. logits) of the current parameters, via the inference graph."""
        if self._inf_bytes is None:
            raise TrainerError("no inference graph given to StepTrainer(inference_onnx=...)")
        if self._inf_sess is None:
            self._inf_sess = _session(self._inf_bytes, self.threads)
        xe = self._x
        a = np.asarray(x)
        if a.dtype != _np_dtype(xe["dtype"]):
            if a.dtype.kind != _np_dtype(xe["dtype"]).kind:
                raise TrainerError(f"x: dtype {a.dtype} != {xe['dtype']}")
            a = a.astype(_np_dtype(xe["dtype"]))
        if a.shape[1:] != tuple(int(s) for s in xe["shape"][1:]):
            raise TrainerError(f"x: per-sample shape {a.shape[1:]} wrong")
        feed_static = {
            e["name"]: self._cur[e["name"]] for e in self.manifest["inference"]["inputs"][1:]
        }
        outs = []
        for s in range(0, len(a), batch_size):
            feed = {"x": np.ascontiguousarray(a[s : s + batch_size]), **feed_static}
            outs.append(self._inf_sess.run(None, feed)[0])
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy of predict(x) against integer labels y."""
        return float(np.mean(self.predict(x).argmax(axis=1) == np.asarray(y)))
