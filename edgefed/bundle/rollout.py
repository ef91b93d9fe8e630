"""Roll-out of signed bundles over MQTT (coordinator publishes, devices install and report).

Topics (next to the fleet layout of :class:`edgefed.transport.Topics`)::

    <prefix>/<fleet>/bundle/<group>          coordinator -> devices, QoS 1, chunked
    <prefix>/<fleet>/bundle-status/<device>  device -> coordinator, QoS 1, JSON report

``group`` is ``all`` for the whole fleet or any group name a device subscribes to. The
message is a multipart message (:mod:`edgefed.transport.message`) with a small JSON
header (model version, sha256 and size of the bundle) and the bundle bytes as the one
part; the transport chunks it. Bundles are not retained (chunked messages cannot be):
devices keep persistent sessions, so the broker queues a roll-out for devices offline.

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
from edgefed.bundle.signing import VerifyKey, load_verify_key
from edgefed.bundle.unpack import (
    InstalledBundle,
    _dummy_inputs,
    current,
    install_bundle,
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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> RolloutReport:
        try:
            obj = json.loads(data.decode("utf-8"))
            return RolloutReport(**obj)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise MessageError(f"bad roll-out report: {e}") from None


# --- coordinator side -----------------------------------------------------------------


def publish_bundle(client: Any, topics: Topics, bundle: bytes, group: str = ALL) -> bytes:
    """Publish ``bundle`` to a group (chunked by the client); returns the message id.

    ``client`` is an :class:`edgefed.transport.client.MqttClient` (anything with
    ``publish(topic, payload)``). The header is informational; devices verify the bundle.
    """
    from edgefed.bundle.format import read_archive

    raw = read_archive(bundle)  # refuse to send something that is not even a bundle
    version = Manifest.from_json(raw.manifest_bytes).model_version
    header = {
        "kind": "bundle",
        "model_version": version,
        "sha256": hashlib.sha256(bundle).hexdigest(),
        "size": len(bundle),
    }
    return client.publish(bundle_topic(topics, group), pack(header, {"bundle": bundle}))


def collect_reports(
    client: Any, topics: Topics, devices: set[str], timeout: float = 60.0
) -> dict[str, RolloutReport]:
    """Wait for one report from each of ``devices`` (the client subscribes to
    :func:`all_status_topic`); malformed reports are logged and skipped."""
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


class DeviceRollout:
    """Handles roll-out messages on a device: install, activate, roll back, report.

    ``activate(installed)`` is the agent's hook to start using the new model (reload its
    session); raising any exception there triggers an automatic rollback.
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
    ) -> None:
        self.client, self.topics, self.device = client, topics, check_name("device id", device)
        self.root = Path(root_dir)
        self.key = load_verify_key(public_key)
        self.activate = activate
        self.topics_in = [bundle_topic(topics, g) for g in groups]

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
        try:
            header, parts = unpack(payload)
            offered = require(header, "model_version", str)
            bundle = parts.get("bundle")
            if bundle is None or set(parts) != {"bundle"}:
                raise MessageError(f"expected one part 'bundle', got {sorted(parts)}")
            if require(header, "sha256", str) != hashlib.sha256(bundle).hexdigest():
                raise MessageError("bundle sha256 does not match the message header")
            report = self._install(bundle, before, offered)
        except (MessageError, BundleError) as e:
            reason = e.reason
            log.warning("%s: roll-out of %s refused: %s", self.device, offered, reason)
            report = RolloutReport(self.device, "refused", before, offered, reason)
        self.client.publish(status_topic(self.topics, self.device), report.to_json())
        return report

    def _install(self, bundle: bytes, before: str | None, offered: str) -> RolloutReport:
        latency: dict[str, float] = {}

        def check(directory: Path, manifest: Manifest) -> None:
            latency["ms"] = measure_latency_ms(directory / MODEL_NAME, manifest)

        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".efb", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bundle)
            installed = install_bundle(tmp, self.key, self.root, load_check=check)
        finally:
            os.unlink(tmp)
        version = installed.manifest.model_version
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
                )
        return RolloutReport(
            self.device, "installed", version, offered, "", latency.get("ms"), before
        )

    def serve(self, stop: Callable[[], bool], poll: float = 0.2) -> None:
        """Drain the client's inbox until ``stop()``; other topics are ignored."""
        while not stop():
            msg = self.client.get(timeout=poll)
            if msg is not None and self.handles(msg.topic):
                self.handle(msg.payload)
