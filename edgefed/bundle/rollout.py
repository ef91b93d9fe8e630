"""Roll-out of signed bundles over MQTT (coordinator publishes, devices install and report).

Topics (next to the fleet layout of :class:`edgefed.transport.Topics`)::

    <prefix>/<fleet>/bundle/<group>          coordinator -> devices, QoS 1, chunked
    <prefix>/<fleet>/bundle-status/<device>  device -> coordinator, QoS 1, JSON report

``group`` is ``all`` for the whole fleet or any group name a device subscribes to. The
message is a multipart message (:mod:`edgefed.transport.message`) with a small JSON
header (kind, mode, model version, sha256 and size of the bundle) and the bundle bytes as
the one part; the transport chunks it. Bundles are not retained (chunked messages cannot be):
devices keep persistent sessions, so the broker queues a roll-out for devices offline.

Canary roll-out: a bundle published with ``mode = "canary"`` is installed like any other,
then the device evaluates it AND the model it replaced on its own held-out data and reports
both accuracies and batch-1 latencies; :func:`decide` turns the canaries' reports into
promote or roll back, and a ``kind = "rollback"`` message (no parts) makes every device of
the group whose current bundle is that version return to the one before.

A device trusts nothing in the header: the bundle is verified (signature, hashes, limits)
by :func:`install_bundle`, its model is loaded and timed BEFORE the swap (a model that
does not load never becomes current), and after the swap the agent's ``activate`` hook
(e.g. reloading its inference session) runs; if that fails the device rolls back
automatically. Every outcome is reported with a reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.bundle.format import MODEL_NAME, BundleError, Manifest
from edgefed.bundle.runner import BundleModel, InputContract, accuracy, check_input, latency_ms
from edgefed.bundle.signing import VerifyKey, load_verify_key
from edgefed.bundle.unpack import (
    InstalledBundle,
    _dummy_inputs,
    current,
    install_bundle,
    roll_back_version,
    rollback,
)
from edgefed.transport.message import MessageError, pack, require, unpack
from edgefed.transport.topics import Topics, check_name

log = logging.getLogger(__name__)
ALL = "all"


def bundle_topic(topics: Topics, group: str = ALL) -> str:
    return topics.bundle(group)  # every topic is built in edgefed.protocol.topics


def status_topic(topics: Topics, device: str) -> str:
    return topics.bundle_status(device)


def all_status_topic(topics: Topics) -> str:
    return topics.all_bundle_status


@dataclass
class RolloutReport:
    """What a device says after a roll-out message."""

    device: str
    status: str  # "installed", "refused", "rolled_back", "unchanged"
    model_version: str | None  # version active on the device now
    offered_version: str | None
    reason: str = ""
    latency_ms_b1: float | None = None  # measured on the device, batch 1, median
    previous_version: str | None = None
    mode: str = "install"  # "install", "canary" or "rollback"
    # Canary evaluation on the device's held-out data: the offered bundle vs the model it
    # replaced ("baseline": the previous bundle, or the federated model when there was none).
    eval_samples: int = 0
    accuracy: float | None = None
    baseline_version: str | None = None
    baseline_accuracy: float | None = None
    baseline_latency_ms: float | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> RolloutReport:
        try:
            obj = json.loads(data.decode("utf-8"))
            known = set(RolloutReport.__dataclass_fields__)
            return RolloutReport(**{k: v for k, v in obj.items() if k in known})
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as e:
            raise MessageError(f"bad roll-out report: {e}") from None


# --- coordinator side -----------------------------------------------------------------


MODES = ("install", "canary")


def publish_bundle(
    client: Any, topics: Topics, bundle: bytes, group: str = ALL, mode: str = "install"
) -> bytes:
    """Publish ``bundle`` to a group (chunked by the client); returns the message id.

    ``client`` is an :class:`edgefed.transport.client.MqttClient` (anything with
    ``publish(topic, payload)``). The header is informational; devices verify the bundle.
    ``mode = "canary"`` asks the devices to evaluate it against their current model.
    """
    from edgefed.bundle.format import read_archive

    if mode not in MODES:
        raise ValueError(f"roll-out mode must be one of {MODES}, not {mode!r}")
    raw = read_archive(bundle)  # refuse to send something that is not even a bundle
    version = Manifest.from_json(raw.manifest_bytes).model_version
    header = {
        "kind": "bundle",
        "mode": mode,
        "model_version": version,
        "sha256": hashlib.sha256(bundle).hexdigest(),
        "size": len(bundle),
    }
    return client.publish(bundle_topic(topics, group), pack(header, {"bundle": bundle}))


def publish_rollback(client: Any, topics: Topics, version: str, group: str) -> bytes:
    """Tell ``group``: whoever runs bundle ``version`` returns to the model before it."""
    header = {"kind": "rollback", "model_version": version}
    return client.publish(bundle_topic(topics, group), pack(header))


@dataclass(frozen=True)
class Decision:
    """Outcome of a canary: promote or not, why, and the fleet-weighted figures."""

    promote: bool
    reason: str
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    latency_ms: float | None = None
    baseline_latency_ms: float | None = None


def decide(
    reports: dict[str, RolloutReport],
    devices: set[str],
    version: str,
    accuracy_budget_pp: float = 1.0,
    latency_budget: float = 1.5,
) -> Decision:
    """Promote only when every canary installed ``version`` and evaluated it, the
    sample-weighted accuracy over the canaries is at most ``accuracy_budget_pp`` percentage
    points below the weighted accuracy of the models they ran before (on the same data),
    and the median batch-1 latency is at most ``latency_budget`` times the baseline's."""
    missing = sorted(devices - set(reports))
    if missing:
        return Decision(False, f"no report from canary devices {missing}")
    bad = {d: r for d, r in reports.items() if d in devices and r.status != "installed"}
    if bad:
        d, r = sorted(bad.items())[0]
        return Decision(False, f"canary {d} {r.status} {version}: {r.reason}")
    reps = [reports[d] for d in sorted(devices)]
    unevaluated = [r.device for r in reps if r.accuracy is None or r.baseline_accuracy is None]
    if unevaluated or any(r.model_version != version for r in reps):
        return Decision(False, f"canaries {unevaluated} did not evaluate {version}")
    n = sum(max(r.eval_samples, 0) for r in reps)
    if n == 0:
        return Decision(False, "canaries hold no held-out samples to evaluate on")
    acc = sum(r.eval_samples * float(r.accuracy) for r in reps) / n  # type: ignore[arg-type]
    base = sum(r.eval_samples * float(r.baseline_accuracy) for r in reps) / n  # type: ignore[arg-type]
    lat = statistics.median(float(r.latency_ms_b1 or 0.0) for r in reps)
    base_lat = statistics.median(float(r.baseline_latency_ms or 0.0) for r in reps)
    figures = {
        "accuracy": acc, "baseline_accuracy": base, "latency_ms": lat,
        "baseline_latency_ms": base_lat,
    }  # fmt: skip
    drop_pp = 100.0 * (base - acc)
    if drop_pp > accuracy_budget_pp:
        why = (
            f"accuracy {100 * acc:.2f}% is {drop_pp:.2f} pp below the current model's "
            f"{100 * base:.2f}% on {n} held-out samples (budget {accuracy_budget_pp} pp)"
        )
        return Decision(False, why, **figures)
    if base_lat > 0 and lat > latency_budget * base_lat:
        why = (
            f"median batch-1 latency {lat:.3f} ms is {lat / base_lat:.2f}x the current "
            f"model's {base_lat:.3f} ms (budget {latency_budget}x)"
        )
        return Decision(False, why, **figures)
    why = (
        f"accuracy {100 * acc:.2f}% vs {100 * base:.2f}% on {n} held-out samples, "
        f"latency {lat:.3f} ms vs {base_lat:.3f} ms"
    )
    return Decision(True, why, **figures)


def collect_reports(
    client: Any,
    topics: Topics,
    devices: set[str],
    timeout: float = 60.0,
    version: str | None = None,
    mode: str | None = None,
) -> dict[str, RolloutReport]:
    """Wait for one report from each of ``devices`` (the client subscribes to
    :func:`all_status_topic`); malformed reports are logged and skipped, and so are reports
    of other devices, or (when given) about another offered ``version`` or ``mode`` - e.g.
    the fleet's answers to an earlier roll-out still queued for this account."""
    got: dict[str, RolloutReport] = {}
    deadline = time.monotonic() + timeout
    prefix = f"{topics.base}/bundle-status/"
    while set(got) < devices and time.monotonic() < deadline:
        msg = client.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
        if msg is None or not msg.topic.startswith(prefix):
            continue
        try:
            rep = RolloutReport.from_json(msg.payload)
            if rep.device != msg.topic[len(prefix) :]:
                raise MessageError(f"report for {rep.device!r} on {msg.topic}")
        except MessageError as e:
            log.warning("rejected roll-out report on %s: %s", msg.topic, e.reason)
            continue
        if rep.device not in devices or rep.device in got:
            continue
        if (version is not None and rep.offered_version != version) or (
            mode is not None and rep.mode != mode
        ):
            continue
        got[rep.device] = rep
    return got


# --- device side ----------------------------------------------------------------------


def measure_latency_ms(model_path: Path, manifest: Manifest, runs: int = 30) -> float:
    """Median batch-1 latency of the model with 1 onnxruntime thread (what a device sees)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        feeds = _dummy_inputs(manifest)
        out = sess.run(None, feeds)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    except Exception as e:  # onnxruntime raises several unrelated types
        raise BundleError(f"model does not load or run in onnxruntime: {e}") from None
    for arr in out:
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise BundleError("model output is not finite on a dummy batch")
    return 1000.0 * statistics.median(times)


Predictor = Callable[[np.ndarray], np.ndarray]


class DeviceRollout:
    """Handles roll-out messages on a device: install, activate, roll back, report.

    ``activate(installed)`` is the agent's hook to start using the new model (reload its
    session); raising any exception there triggers an automatic rollback. ``contract`` is
    the device's data contract (per-sample shape/dtype of its data): a bundle whose input
    does not match is refused before install. ``holdout`` (x, y) is what a canary is
    evaluated on; ``baseline()`` returns (version, predict) of the model the device runs
    when no bundle is installed (its federated model), or None.
    """

    def __init__(
        self,
        client: Any,
        topics: Topics,
        device: str,
        root_dir: str | os.PathLike[str],
        public_key: str | os.PathLike[str] | bytes | VerifyKey,
        *,
        activate: Callable[[InstalledBundle], None] | None = None,
        groups: tuple[str, ...] = (ALL,),
        contract: InputContract | None = None,
        holdout: tuple[np.ndarray, np.ndarray] | None = None,
        baseline: Callable[[], tuple[str, Predictor] | None] | None = None,
    ) -> None:
        self.client, self.topics, self.device = client, topics, check_name("device id", device)
        self.root = Path(root_dir)
        self.key = load_verify_key(public_key)
        self.activate = activate
        self.topics_in = [bundle_topic(topics, g) for g in groups]
        self.contract = contract
        self.holdout = holdout
        self.baseline = baseline

    def subscriptions(self) -> list[str]:
        return list(self.topics_in)

    def handles(self, topic: str) -> bool:
        return topic in self.topics_in

    def _version(self) -> str | None:
        try:
            cur = current(self.root)
        except BundleError:
            return None
        return cur.manifest.model_version if cur else None

    def handle(self, payload: bytes) -> RolloutReport:
        """Process one roll-out message and publish the report; never raises on bad input."""
        before = self._version()
        offered: str | None = None
        mode = "install"
        try:
            header, parts = unpack(payload)
            offered = require(header, "model_version", str)
            if header.get("kind") == "rollback":
                mode = "rollback"
                report = self._roll_back(offered, before)
            else:
                mode = str(header.get("mode", "install"))
                if mode not in MODES:
                    raise MessageError(f"unknown roll-out mode {mode[:40]!r}")
                bundle = parts.get("bundle")
                if bundle is None or set(parts) != {"bundle"}:
                    raise MessageError(f"expected one part 'bundle', got {sorted(parts)}")
                if require(header, "sha256", str) != hashlib.sha256(bundle).hexdigest():
                    raise MessageError("bundle sha256 does not match the message header")
                report = self._install(bundle, before, offered, canary=mode == "canary")
        except (MessageError, BundleError) as e:
            reason = e.reason
            log.warning("%s: roll-out of %s refused: %s", self.device, offered, reason)
            report = RolloutReport(self.device, "refused", before, offered, reason, mode=mode)
        self.client.publish(status_topic(self.topics, self.device), report.to_json())
        return report

    def _roll_back(self, version: str, before: str | None) -> RolloutReport:
        if before != version:
            why = f"{version} is not the active bundle"
            return RolloutReport(self.device, "unchanged", before, version, why, mode="rollback")
        back = roll_back_version(self.root, version)
        if self.activate is not None and back is not None:
            try:
                self.activate(back)
            except Exception as e:
                log.error("%s: re-activating %s failed: %s", self.device, back.path, e)
        now = back.manifest.model_version if back else None
        log.info("%s: rolled back %s -> %s", self.device, version, now or "federated model")
        return RolloutReport(self.device, "rolled_back", now, version, "rollback requested",
                             previous_version=version, mode="rollback")  # fmt: skip

    def _baseline(self) -> tuple[str, Predictor, float | None] | None:
        """(version, predict, latency) of the model active before an install."""
        try:
            cur = current(self.root)
        except BundleError:
            cur = None
        if cur is not None:
            model = BundleModel(cur.model_path, cur.manifest)
            lat = measure_latency_ms(cur.model_path, cur.manifest)
            return cur.manifest.model_version, model.predict, lat
        got = self.baseline() if self.baseline is not None else None
        return None if got is None else (got[0], got[1], None)

    def _install(
        self, bundle: bytes, before: str | None, offered: str, canary: bool = False
    ) -> RolloutReport:
        latency: dict[str, float] = {}

        def check(directory: Path, manifest: Manifest) -> None:
            if self.contract is not None:
                check_input(manifest, self.contract, f"this device's data ({self.device})")
            latency["ms"] = measure_latency_ms(directory / MODEL_NAME, manifest)

        base = self._baseline() if canary and self.holdout is not None else None
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".efb", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bundle)
            installed = install_bundle(tmp, self.key, self.root, load_check=check)
        finally:
            os.unlink(tmp)
        version = installed.manifest.model_version
        mode = "canary" if canary else "install"
        if self.activate is not None:
            try:
                self.activate(installed)
            except Exception as e:  # the agent's runtime failed on the new model
                back = rollback(self.root)
                log.warning("%s: activating %s failed (%s); rolled back", self.device, version, e)
                try:
                    self.activate(back)
                except Exception as e2:
                    log.error("%s: re-activating %s failed too: %s", self.device, before, e2)
                return RolloutReport(
                    self.device,
                    "rolled_back",
                    back.manifest.model_version,
                    offered,
                    f"activation of {version} failed: {e}",
                    latency.get("ms"),
                    before,
                    mode=mode,
                )
        report = RolloutReport(
            self.device, "installed", version, offered, "", latency.get("ms"), before, mode=mode
        )
        if canary:
            self._evaluate(report, installed, base)
        return report

    def _evaluate(
        self,
        report: RolloutReport,
        installed: InstalledBundle,
        base: tuple[str, Predictor, float | None] | None,
    ) -> None:
        """Fill the report's canary figures (a failure is reported, never raised)."""
        if self.holdout is None:
            report.reason = "no held-out data on this device: canary not evaluated"
            return
        x, y = self.holdout
        try:
            model = BundleModel(installed.model_path, installed.manifest)
            report.accuracy = accuracy(model.predict, x, y)
            report.eval_samples = len(y)
            if base is None:
                report.reason = "no current model to compare with"
                return
            report.baseline_version = base[0]
            report.baseline_accuracy = accuracy(base[1], x, y)
            report.baseline_latency_ms = base[2] if base[2] is not None else latency_ms(base[1], x)
        except (BundleError, ValueError, KeyError) as e:
            report.reason = f"canary evaluation failed: {getattr(e, 'reason', e)}"

    def serve(self, stop: Callable[[], bool], poll: float = 0.2) -> None:
        """Drain the client's inbox until ``stop()``; other topics are ignored."""
        while not stop():
            msg = self.client.get(timeout=poll)
            if msg is not None and self.handles(msg.topic):
                self.handle(msg.payload)
