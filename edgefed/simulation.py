"""``edgefed.simulate``: a federated run with your own torch model and per-device data.

Two paths, one code base. By default (``broker=None``) everything runs in this process
without a network: the coordinator's :class:`~edgefed.coordinator.rounds.RoundEngine` builds
real task messages, each :class:`~device_agent.agent.DeviceWorker` decodes them, trains with
the exported ONNX step graph in onnxruntime and returns a real compressed update, which the
engine validates and aggregates - the same bytes and code as over MQTT, minus the broker.
With ``broker="embedded"`` or ``broker="mqtt://host:port"`` the same run goes over MQTT: a
coordinator service and one agent thread per device.

Example (five devices, an MLP with 10 inputs, 10 hidden units, 2 classes)::

    import numpy as np, torch, edgefed
    rng = np.random.default_rng(0)
    def data(n):
        x = rng.standard_normal((n, 10)).astype(np.float32)
        return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    history = edgefed.simulate(model, [data(100) for _ in range(5)], rounds=10,
                               strategy="fedavg", compression="int8", test_data=data(500))
    print(history.accuracy[-1])
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.coordinator.metrics import MetricsWriter
from edgefed.coordinator.rounds import RoundConfig, RoundEngine
from edgefed.strategies import Strategy, make_strategy

log = logging.getLogger(__name__)


class History(list):
    """Per-round metric dicts (see :class:`~edgefed.coordinator.metrics.RoundMetrics`)."""

    @property
    def accuracy(self) -> list[float | None]:
        return [h["accuracy"] for h in self]

    @property
    def cum_bytes_up(self) -> list[int]:
        return [h["cum_bytes_up"] for h in self]

    @property
    def final_accuracy(self) -> float | None:
        return self[-1]["accuracy"] if self else None

    @property
    def clock_s(self) -> list[float]:
        """Seconds from the start to each model version (simulated with ``speeds``)."""
        return [h["clock_s"] for h in self]


def _numpy(a: Any, dtype: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def make_evaluator(
    inference_onnx: bytes, manifest: dict[str, Any], x: np.ndarray, y: np.ndarray
) -> Callable[[dict[str, np.ndarray]], tuple[float, float]]:
    from device_agent.inference import InferenceModel

    im = InferenceModel(inference_onnx, manifest, threads=1)
    return lambda params: im.evaluate(x, y, params)


def simulate(
    model: Any,
    device_datasets: Sequence[tuple[Any, Any]],
    rounds: int = 10,
    strategy: str | Strategy = "fedavg",
    compression: str = "int8",
    *,
    downlink: str = "int8",
    test_data: tuple[Any, Any] | None = None,
    local_epochs: int = 1,
    batch_size: int = 16,
    lr: float = RoundConfig.lr,  # one default, the coordinator's
    momentum: float = 0.0,
    fraction: float = 1.0,
    error_feedback: bool = True,
    seed: int = 0,
    strategy_params: dict[str, Any] | None = None,
    head: list[str] | str | None = None,
    weak_devices: Sequence[int] = (),
    broker: str | None = None,
    work_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    round_timeout: float = 120.0,
    verbose: bool = False,
    loss: str = "cross_entropy",
    federated_model: Any = None,
    mode: str = RoundConfig.mode,
    buffer_size: int = RoundConfig.buffer_size,
    max_staleness: int = RoundConfig.max_staleness,
    max_concurrent: int = RoundConfig.max_concurrent,
    staleness_weight: str = RoundConfig.staleness_weight,
    speeds: Sequence[float] | None = None,
    step_time: float = 1.0,
    offline_fraction: float = 0.0,
    offline_period: float = 5.0,
    links: Sequence[float] | None = None,
    upload_budget_s: float = 0.0,
    ladder: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
) -> History:
    """Federate ``model`` over ``device_datasets`` (one (x, y) per device) for ``rounds``.

    ``compression`` is the uplink spec (``"none"``, ``"int8"``, ``"topk:0.01+int8"``...),
    ``downlink`` the spec of the global weights sent down. ``head`` ("last" or names) plus
    ``weak_devices`` (indices) gives those devices a head-only step graph (mixed fleet).
    Returns a :class:`History` (list of per-round dicts; accuracy needs ``test_data``).

    ``mode="async"``: buffered asynchronous aggregation (FedBuff): ``rounds`` model versions
    of ``buffer_size`` accepted updates each, updates more than ``max_staleness`` versions
    behind dropped, the others weighted by ``staleness_weight``.

    A simulated fleet (in-process runs): ``speeds`` (one multiplier per device) makes a task
    take ``step_time * speed`` simulated seconds, ``offline_fraction`` of the time each device
    is offline (spells of ``offline_period`` s on average), ``links`` (bytes/s per device)
    add each update's upload time and are reported as the devices' measured uplink, which
    ``upload_budget_s`` and ``ladder`` turn into a per-device spec. ``History.clock_s`` is then
    the simulated time of every model version. ``checkpoint``: resume from / save to it.
    """
    from edgefed.coordinator.model import build_federated_model

    if not device_datasets:
        raise ValueError("need at least one device dataset")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    datasets = []
    for i, (x, y) in enumerate(device_datasets):
        xa, ya = _numpy(x, np.float32), _numpy(y, np.int64)
        if len(xa) != len(ya) or len(xa) == 0:
            raise ValueError(f"device {i}: x and y must be non-empty and equally long")
        datasets.append((xa, ya))
    strat = (
        strategy
        if isinstance(strategy, Strategy)
        else make_strategy(strategy, **(strategy_params or {}))
    )
    fm = federated_model
    if fm is None:
        import torch

        x0, y0 = datasets[0]
        ex = (torch.from_numpy(x0[:8].copy()), torch.from_numpy(y0[:8].copy()))
        fm = build_federated_model(
            model, ex, loss=loss, momentum=momentum, head=head, fedprox=strat.name == "fedprox"
        )
    evaluate = None
    if test_data is not None:
        g = fm.graphs["full"]
        evaluate = make_evaluator(
            g.inference_onnx,
            g.manifest,
            _numpy(test_data[0], np.float32),
            _numpy(test_data[1], np.int64),
        )
    cfg = RoundConfig(
        min_devices=len(datasets) if broker else 1,
        fraction=fraction,
        local_epochs=local_epochs,
        batch_size=batch_size,
        lr=lr,
        uplink=compression,
        downlink=downlink,
        error_feedback=error_feedback,
        round_timeout=round_timeout,
        seed=seed,
        mode=mode,
        buffer_size=buffer_size,
        max_staleness=max_staleness,
        max_concurrent=max_concurrent,
        staleness_weight=staleness_weight,
        upload_budget_s=upload_budget_s,
        ladder=list(ladder) if ladder is not None else RoundConfig().ladder,
    )
    engine = RoundEngine(fm, strat, cfg, evaluate)
    profile = None
    if broker is not None and (speeds is not None or offline_fraction or links is not None):
        raise ValueError("speeds, offline_fraction and links simulate time: in-process only")
    if speeds is not None or offline_fraction or links is not None:
        from edgefed.coordinator.fleet_clock import FleetProfile

        n = len(datasets)
        profile = FleetProfile(
            list(speeds) if speeds is not None else [1.0] * n,
            step_time, offline_fraction, offline_period,
            list(links) if links is not None else None, seed,
        )  # fmt: skip
    writer = MetricsWriter(metrics_path, None)
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgefed-sim-")
        work_dir = tmp.name
    try:
        ids = [f"dev-{i:03d}" for i in range(len(datasets))]
        weak = set(weak_devices)
        if broker is None:
            hist = _run_inprocess(
                engine, ids, datasets, weak, Path(work_dir), rounds, writer, verbose, profile,
                checkpoint,
            )  # fmt: skip
        else:
            hist = _run_mqtt(
                engine, ids, datasets, weak, Path(work_dir), rounds, writer, broker, verbose,
                checkpoint=checkpoint,
            )  # fmt: skip
    finally:
        if tmp is not None:
            tmp.cleanup()
    return hist


def _run_inprocess(
    engine: RoundEngine,
    ids: list[str],
    datasets: list[tuple[np.ndarray, np.ndarray]],
    weak: set[int],
    work: Path,
    rounds: int,
    writer: MetricsWriter,
    verbose: bool,
    profile: Any = None,  # coordinator.fleet_clock.FleetProfile
    checkpoint: str | Path | None = None,
) -> History:
    from device_agent.agent import DeviceWorker
    from edgefed.coordinator.adaptive import AdaptiveUplink
    from edgefed.coordinator.loop import InProcessCollector, run_rounds

    workers = {
        d: DeviceWorker(d, x, y, work / d, persist_model=False, durable=False)
        for d, (x, y) in zip(ids, datasets, strict=True)
    }
    for i, d in enumerate(ids):
        caps: dict[str, Any] = {"profile": "weak"} if i in weak else {}
        if profile is not None and profile.links is not None:  # what its agent would measure
            caps[AdaptiveUplink.RATE_KEY] = profile.links[i]
        engine.register(d, caps, [])
    if verbose:
        writer.progress = sys.stdout
    collector = InProcessCollector(engine, workers, profile)
    run_rounds(engine, collector, rounds, checkpoint, metrics=writer)
    return History(engine.history)


def _run_mqtt(
    engine: RoundEngine,
    ids: list[str],
    datasets: list[tuple[np.ndarray, np.ndarray]],
    weak: set[int],
    work: Path,
    rounds: int,
    writer: MetricsWriter,
    broker: str,
    verbose: bool,
    fleet: str | None = None,
    checkpoint: str | Path | None = None,
) -> History:
    from device_agent.agent import AgentService, DeviceWorker
    from edgefed.coordinator.service import CoordinatorService
    from edgefed.transport import TransportConfig
    from edgefed.transport.broker import EmbeddedBroker

    emb = EmbeddedBroker().start() if broker == "embedded" else None
    url = emb.url if emb else broker
    fleet = fleet or f"sim-{int(time.time() * 1000) % 10**9}"
    tc = TransportConfig(url=url, fleet=fleet, backoff_min=0.2, backoff_max=5.0)
    agents = [
        AgentService(
            DeviceWorker(d, x, y, work / d, persist_model=True),
            tc,
            profile="weak" if i in weak else None,
        )
        for i, (d, (x, y)) in enumerate(zip(ids, datasets, strict=True))
    ]
    writer.progress = sys.stdout if verbose else None
    svc = CoordinatorService(
        engine,
        tc,
        rounds,
        checkpoint=checkpoint or work / "coordinator.ckpt.npz",
        metrics=writer,
        wait_timeout=120.0,
    )
    threads = []
    try:
        threads = [a.start_thread() for a in agents]
        svc.run()
    finally:
        for a in agents:
            a.stop()
        for t in threads:
            t.join(timeout=15)
        if emb:
            emb.stop()
    return History(engine.history)  # with a resumed checkpoint, the earlier rounds too
