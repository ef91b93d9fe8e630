"""The device agent: receives a task, trains locally with the exported step graph, sends a
compressed update with error feedback, and keeps its state on disk (no torch).

:class:`DeviceWorker` is the transport-free core (task bytes in, update bytes out), used
as-is by the in-process simulation; :class:`AgentService` connects it to MQTT: presence
with capabilities and a Last Will, a persistent session on its task topic, and reconnects.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.config import AgentConfig  # noqa: F401  (re-exported: its old home)
from device_agent.state import AgentState
from edgefed.codec import (
    CodecError,
    CompressionSpec,
    ErrorFeedback,
    ModelSchema,
    UpdateMeta,
    decode_update,
    encode_update,
)
from edgefed.protocol import MessageError, ModelHeader, TaskHeader, UpdateHeader, pack, unpack
from edgefed.transport import Topics, TransportConfig

log = logging.getLogger(__name__)


def capabilities(profile: str | None = None) -> dict[str, Any]:
    """What the coordinator uses to pick a graph: arch, cores, RAM, onnxruntime version; and
    the C++ kernels' instruction set, so an operator sees which code path a device runs."""
    import onnxruntime

    from edgefed.quant import best_isa

    try:
        ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        ram_mb = 0
    caps: dict[str, Any] = {
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "ram_mb": int(ram_mb),
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "isa": best_isa(),
    }
    if profile:
        caps["profile"] = profile
    return caps


class DeviceWorker:
    """Task in, update out. Persistent: residual, model version and the last update survive
    a restart (see :mod:`device_agent.state`)."""

    def __init__(
        self,
        device_id: str,
        x: np.ndarray,
        y: np.ndarray,
        state_dir: str | Path,
        threads: int = 1,
        persist_model: bool = True,
        durable: bool = True,
        data_file: str | Path | None = None,
        step_s: float = 0.0,  # fleet emulation: [agent] emulate_step_s
    ) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{device_id}: need matching, non-empty x and y")
        self.device_id = device_id
        self.x, self.y = x, y
        self.state = AgentState(state_dir, device_id, durable)
        self.threads = threads
        self.step_s = step_s
        self.persist_model = persist_model
        self._trainers: dict[str, Any] = {}
        self._contract: dict[str, str | None] = {}  # graph sha -> data contract mismatch
        self.data_file = str(data_file) if data_file is not None else f"{device_id}'s data"
        self._ef: ErrorFeedback | None = None
        self.last_loss: float | None = None
        self.train_seconds = 0.0
        self.train_log: list[tuple[int, float, float]] = []  # (round, wall s, thread CPU s)

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def saved_residual(self) -> dict[str, np.ndarray]:
        """The error-feedback residual held in memory, for a checkpoint of an in-process
        simulation (``durable=False`` devices keep it nowhere else; see
        coordinator/loop.py ``InProcessCollector.saved_state``)."""
        return self._ef.residuals() if self._ef is not None else {}

    def restore_residual(self, run: str, res: dict[str, np.ndarray], schema: ModelSchema) -> None:
        """Take back :meth:`saved_residual` when a simulation resumes, so it compresses
        exactly as a run that never stopped."""
        self.state.start_run(run)  # already following the run: its residual stays
        self._ef = ErrorFeedback(schema) if res else None
        for name, v in res.items():
            self._ef.residual(name, v.shape)[:] = v.reshape(-1)  # type: ignore[union-attr]

    def _feedback(self, schema: ModelSchema) -> ErrorFeedback:
        if self._ef is None or self._ef.schema.to_json() != schema.to_json():
            p = self.state.residual_path
            self._ef = ErrorFeedback(schema)
            if p.exists():
                try:
                    self._ef = ErrorFeedback.load(p, schema)
                except CodecError as e:  # another model, or a torn file from old software
                    log.warning("%s: residual reset: %s", self.device_id, e.reason)
        return self._ef

    def _trainer(self, sha: str) -> tuple[Any, dict[str, Any]]:
        if sha not in self._trainers:
            from device_agent.trainer import StepTrainer

            step, manifest, _ = self.state.load_graph(sha)
            self._trainers[sha] = (StepTrainer(step, manifest, threads=self.threads), manifest)
        return self._trainers[sha]

    def federated_predictor(self) -> tuple[str, Any] | None:
        """(version, predict) of the last federated model received (what the device runs
        without a bundle), or None before the first one."""
        from device_agent.inference import InferenceModel

        try:
            params, sha, version = self.state.load_model()
            _, manifest, inference = self.state.load_graph(sha)
        except (OSError, KeyError, ValueError):
            return None
        model = InferenceModel(inference, manifest)
        return version, lambda x: model.predict(x, params)

    def contract_mismatch(self, sha: str | None = None) -> str | None:
        """Why this device's data do not fit the data contract of graph ``sha`` (default:
        the graph of the last model received, what a restarted agent checks at start-up),
        or None (fits, or no contract known yet)."""
        from device_agent.contract import contract_mismatch

        if sha is None:
            try:
                sha = self.state.load_model()[1]
            except (OSError, ValueError, KeyError):
                return None
        if sha not in self._contract:
            if not self.state.has_graph(sha):
                return None
            manifest = json.loads((self.state.graph_dir(sha) / "manifest.json").read_text())
            self._contract[sha] = contract_mismatch(
                manifest.get("data_contract"), self.x, self.y, self.data_file
            )
        return self._contract[sha]

    def _error(self, rnd: int, msg: str, refused: bool = False) -> bytes:
        """An answer without an update: the coordinator counts it as a drop with ``msg``
        (``refused``: the device declined the task, as opposed to failing on it)."""
        header = {
            "round": rnd,
            "device_id": self.device_id,
            "update_id": secrets.token_hex(8),
            "error": msg,
        }
        if refused:
            header["refused"] = True
        return pack(header)

    def _refuse(self, rnd: int, msg: str) -> bytes:
        log.warning("%s: refused task of round %d: %s", self.device_id, rnd, msg)
        return self._error(rnd, msg, refused=True)

    def handle_task(self, data: bytes) -> bytes | None:
        """Train on one task; returns the update message, or a refusal/error message the
        coordinator counts with its reason (None if the bytes are not a usable task)."""
        try:
            header, parts = unpack(data)
            if header.get("type") == "model":
                self._receive_model(ModelHeader.parse(header), parts)
                return None
            task = TaskHeader.parse(header)
            rnd, version, sha = task.round, task.model_version, task.graph_sha
            hyper, uplink = task.hyper, task.uplink
            schema = ModelSchema(task.schema)
            run = task.run_id  # absent from coordinators older than issue 14
            if run is not None and not 0 < len(run) <= 64:
                raise MessageError("run_id must be a short string")
        except (MessageError, CodecError) as e:
            log.warning("%s: rejected task: %s", self.device_id, getattr(e, "reason", e))
            return None
        st = self.state
        if run is not None and run != st.run_id:
            if run in st.past_runs:
                return self._refuse(rnd, f"task of an earlier run {run} (following {st.run_id})")
            log.info("%s: new run %s (was %s, done round %d): following it, error-feedback "
                     "state reset", self.device_id, run, st.run_id, st.last_round)  # fmt: skip
            st.start_run(run)
            self._ef = None
        if rnd == st.last_round and st.last_update_id:
            out = st.load_outbox()
            if out is not None:
                log.info("%s: task of round %d redelivered: resending update", self.device_id, rnd)
                return out
        if rnd < st.last_round:
            of_run = f" of run {st.run_id}" if st.run_id else ""
            return self._refuse(rnd, f"stale task for round {rnd} (done {st.last_round}{of_run})")
        if "graph" in parts:
            try:
                json.loads(parts["manifest"])
            except (KeyError, ValueError):
                log.warning("%s: task carries a graph without a valid manifest", self.device_id)
                return self._error(rnd, "bad graph manifest")
            st.save_graph(sha, parts["graph"], parts["manifest"], parts.get("inference", b""))
        if not st.has_graph(sha):
            return self._error(rnd, f"missing graph {sha}")
        mismatch = self.contract_mismatch(sha)
        if mismatch is not None:  # before any training: refused, the reason reported
            log.error("%s: %s", self.device_id, mismatch)
            return self._refuse(rnd, mismatch)
        log.info("%s: round %d: training on %d samples", self.device_id, rnd, self.num_samples)
        try:
            wupd = decode_update(parts.get("weights", b""), schema)
            if wupd.meta.kind != "weights" or wupd.meta.round != rnd:
                raise CodecError("weights metadata does not match the task")
            weights = {k: np.asarray(v, np.float32) for k, v in wupd.to_dense().items()}
            spec = CompressionSpec.parse(uplink)
        except CodecError as e:
            log.warning("%s: rejected task weights: %s", self.device_id, e.reason)
            return self._error(rnd, f"bad weights: {e.reason}")
        tr, manifest = self._trainer(sha)
        t0, c0 = time.perf_counter(), time.thread_time()
        tr.set_params(weights)
        tr.reset_optimizer_state()  # local optimizer state starts fresh every round
        kwargs: dict[str, Any] = {}
        if manifest.get("fedprox") and "prox_mu" in hyper:
            kwargs["mu"] = float(hyper["prox_mu"])
        stats = tr.train_epochs(
            self.x,
            self.y,
            epochs=int(hyper.get("epochs", 1)),
            batch_size=int(hyper.get("batch_size", 16)),
            lr=float(hyper.get("lr", 0.05)),
            seed=int(hyper.get("seed", 0)),
            step_s=self.step_s,
            **kwargs,
        )
        train_s = time.perf_counter() - t0
        train_cpu = time.thread_time() - c0  # onnxruntime (1 thread) runs in this thread
        new = tr.params
        updated = list(manifest["trainable"]) + list(manifest.get("updated_buffers", []))
        delta = {k: (np.asarray(new[k], np.float32) - weights[k]) for k in updated}
        loss = _loss_of(stats)
        meta = UpdateMeta(rnd, self.device_id, self.num_samples, version, kind="delta")
        ef = self._feedback(schema) if task.error_feedback else None
        payload = encode_update(delta, meta, spec, feedback=ef)
        update_id = secrets.token_hex(8)
        self.train_seconds = train_s
        self.train_log.append((rnd, train_s, train_cpu))
        # The header repeats round/device/num_samples from the codec metadata so the
        # coordinator can drop late or duplicate updates before decoding; kept short
        # because at top-1% every byte counts.
        head = UpdateHeader(rnd, self.device_id, update_id, self.num_samples, loss)
        out = pack(head.to_dict(), {"update": payload})
        # Persist before sending: outbox and residual first, state.json (the commit) last.
        st.save_outbox(out)
        if ef is not None and st.durable:  # (simulations keep the residual in memory)
            ef.save(st.residual_path)
        if self.persist_model:
            st.save_model(weights, sha, version)
        st.model_version, st.last_round, st.last_update_id = version, rnd, update_id
        st.rounds_done += 1
        st.save()
        self.last_loss = loss
        return out

    def _receive_model(self, header: ModelHeader, parts: dict[str, bytes]) -> None:
        """The coordinator's final model (after the last round): store it as the deployed
        model without training, so ``predict`` runs the model the run ended with."""
        rnd, version, sha = header.round, header.model_version, header.graph_sha
        schema = ModelSchema(header.schema)
        if "graph" in parts and "manifest" in parts:
            inference = parts.get("inference", b"")
            self.state.save_graph(sha, parts["graph"], parts["manifest"], inference)
        if not self.state.has_graph(sha):
            raise MessageError(f"final model {version} needs graph {sha}, which this device lacks")
        wupd = decode_update(parts.get("weights", b""), schema)
        if wupd.meta.kind != "weights" or wupd.meta.round != rnd:
            raise CodecError("final model weights metadata does not match the header")
        weights = {k: np.asarray(v, np.float32) for k, v in wupd.to_dense().items()}
        self.state.save_model(weights, sha, version)
        self.state.model_version = version
        self.state.save()
        log.info("%s: final model %s of run %s stored", self.device_id, version, header.run_id)


def _loss_of(stats: Any) -> float | None:
    v = stats.get("loss") if isinstance(stats, dict) else getattr(stats, "loss", None)
    if v is None and isinstance(stats, dict):
        v = stats.get("mean_loss")
    try:
        f = float(np.mean(v)) if v is not None else None
    except (TypeError, ValueError):
        return None
    return f if f is not None and np.isfinite(f) else None


def client_id(fleet: str, device: str) -> str:
    """MQTT client id of a device agent: the fleet is part of it (issue 14)."""
    return f"edgefed-device-{fleet}-{device}"


def _activate_bundle(installed: Any) -> None:
    """Roll-out hook: the new model must open in the session ``edgefed-agent predict`` uses
    (one thread, CPU); raising here makes DeviceRollout roll back and report it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ort.InferenceSession(str(installed.model_path), opts, providers=["CPUExecutionProvider"])


class AgentService:
    """One device on MQTT. ``run()`` blocks until :meth:`stop`."""

    def __init__(
        self,
        worker: DeviceWorker,
        transport: TransportConfig,
        profile: str | None = None,
        verifier: Any = None,  # edgefed.security.downlink.DownlinkVerifier | None
        bundle_key: str | None = None,  # roll-out on: signed bundles install under state_dir
        groups: tuple[str, ...] = ("all",),
        holdout: tuple[np.ndarray, np.ndarray] | None = None,  # canary evaluation data
    ) -> None:
        from dataclasses import replace

        from edgefed.transport.client import MqttClient

        self.worker = worker
        self.topics = Topics(transport.fleet, transport.topic_prefix)
        dev = worker.device_id
        offline = json.dumps({"status": "offline", "device_id": dev}).encode()
        # The client id names the fleet: devices of two fleets with the same id share a broker
        # without taking over each other's session. The account stays the device id (a secured
        # broker uses it as the client id anyway, use_username_as_clientid).
        if not (transport.username or transport.broker.username):
            transport = replace(transport, username=dev)
        self._process_id = secrets.token_hex(4)  # tells a restart from a re-announce
        self.client = MqttClient(
            transport,
            client_id(transport.fleet, dev),
            subscriptions=[self.topics.task(dev)],
            will=(self.topics.presence(dev), offline),
        )
        # Bundles are signed by the bundle key (checked by install_bundle), not wrapped in the
        # downlink envelope: they are routed to the roll-out before task verification.
        self.rollout = None
        if bundle_key is not None:
            from edgefed.bundle.rollout import DeviceRollout
            from edgefed.bundle.runner import InputContract

            self.rollout = DeviceRollout(
                self.client, self.topics, dev, worker.state.dir / "bundles", bundle_key,
                activate=_activate_bundle, groups=groups, contract=InputContract.of(worker.x),
                holdout=holdout if holdout is not None else (worker.x, worker.y),
                baseline=worker.federated_predictor,
            )  # fmt: skip
            self.client.subscriptions = [*self.client.subscriptions, *self.rollout.subscriptions()]
        self.caps = capabilities(profile)
        self._stop = threading.Event()
        self.updates_sent = 0
        self.refused: list[str] = []  # reasons of refused (unsigned, forged, replayed) downlink
        self.verifier = verifier
        if verifier is None:
            log.warning("%s: no coordinator_key: accepting UNSIGNED tasks (demo only)", dev)
        else:  # a restart must not reopen the replay window: nothing older than our last round
            verifier.load_state({self.topics.task(dev): max(0, worker.state.last_round)})

    def announce(self) -> None:
        caps = dict(self.caps)
        if self.client.uplink.rate is not None:  # measured from PUBACKs (issue 15); older
            caps["uplink_bytes_per_s"] = round(self.client.uplink.rate)  # coordinators ignore it
        msg = {
            "status": "online",
            "device_id": self.worker.device_id,
            "capabilities": caps,
            "num_samples": self.worker.num_samples,
            "graphs": self.worker.state.graphs(),
            "model_version": self.worker.state.model_version,
            "run_id": self.worker.state.run_id,  # the run (and round) it last worked on
            "last_round": self.worker.state.last_round,
            # which connection this is (this process's random id + its connect count): the
            # coordinator re-sends an open round's task only after a reconnect or restart,
            # not on a re-announce that merely carries a new uplink rate
            "connection": f"{self._process_id}-{self.client.connects}",
        }
        if self.rollout is not None:
            msg["bundle_version"] = self.rollout._version()
        self.client.publish(
            self.topics.presence(self.worker.device_id), json.dumps(msg).encode(), retain=True
        )

    def run(self, connect_timeout: float | None = None) -> None:
        self.client.start(timeout=connect_timeout)
        announced_at, measured = -1, 0
        try:
            while not self._stop.is_set():
                if self.client.connected.is_set() and (
                    announced_at != self.client.connects or measured != self.client.uplink.samples
                ):
                    announced_at, measured = self.client.connects, self.client.uplink.samples
                    self.announce()  # after every (re)connect and uplink measurement
                m = self.client.get(timeout=0.2)
                if m is None:
                    continue
                if self.rollout is not None and self.rollout.handles(m.topic):
                    rep = self.rollout.handle(m.payload)  # reports its status itself
                    log.info("%s: roll-out %s: %s %s", self.worker.device_id, rep.offered_version,
                             rep.status, rep.reason)  # fmt: skip
                    if rep.status in ("installed", "rolled_back"):
                        self.announce()  # presence carries the bundle version now
                    continue
                payload = m.payload
                if self.verifier is not None:
                    try:
                        payload = self._open_signed(m.topic, m.payload)
                    except ValueError as e:  # EnvelopeError: unsigned, forged, tampered, replayed
                        reason = getattr(e, "reason", str(e))
                        log.warning("%s: refused downlink on %s: %s", self.worker.device_id,
                                    m.topic, e)  # fmt: skip
                        self.refused.append(reason)
                        continue
                try:
                    out = self.worker.handle_task(payload)
                except Exception:  # a bad task must not kill the agent
                    log.exception("%s: task failed", self.worker.device_id)
                    continue
                if out is not None:
                    self.client.publish(self.topics.update(self.worker.device_id), out)
                    self.updates_sent += 1
        finally:
            self.client.stop()

    def _open_signed(self, topic: str, signed: bytes) -> bytes:
        """Verify a downlink message. The round is its anti-replay sequence, so a NEW run's
        round 1 looks like a replay of our old round 14: when the signature is valid and
        the task names a run this device has never followed, accept it and restart the
        sequence there (a task of an earlier run stays refused as a replay)."""
        from edgefed.security.envelope import EnvelopeError

        assert self.verifier is not None
        try:
            return self.verifier.open(topic, signed)[0]
        except EnvelopeError as e:
            if e.reason != "replayed":
                raise
            fresh = copy.copy(self.verifier)
            fresh.load_state({})  # same keys, no sequence floor (signature still checked)
            payload, seq = fresh.open(topic, signed)
            try:
                run = unpack(payload)[0].get("run_id")
            except MessageError:
                raise e from None
            st = self.worker.state
            if not isinstance(run, str) or run == st.run_id or run in st.past_runs:
                raise
            self.verifier.load_state({**self.verifier.state(), topic: seq})
            return payload

    def stop(self) -> None:
        self._stop.set()

    def start_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name=f"agent-{self.worker.device_id}", daemon=True)
        t.start()
        return t
