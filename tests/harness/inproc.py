"""Coordinator service and device agents as threads of the test process."""

from __future__ import annotations

from pathlib import Path


class InProcFleet:
    """Coordinator service and device agents as threads of the test process (so caplog sees
    their log records and the test can read the engine's state), on a real broker."""

    def __init__(
        self, root: Path, model_dir: Path, url: str, devices: list[str], **round_cfg: object
    ) -> None:
        import numpy as np

        from device_agent.agent import AgentService, DeviceWorker
        from edgefed.coordinator.model import FederatedModel
        from edgefed.coordinator.rounds import RoundConfig, RoundEngine
        from edgefed.coordinator.service import CoordinatorService
        from edgefed.strategies import FedAvg
        from edgefed.transport import TransportConfig

        self.transport = TransportConfig(
            url=url,
            fleet="rel",
            backoff_min=0.2,
            backoff_max=2.0,
            keepalive=5,
            **round_cfg.pop("transport", {}),  # type: ignore[arg-type]
        )
        rounds = int(round_cfg.pop("rounds", 2))  # type: ignore[call-overload]
        cfg = {"min_devices": len(devices), "uplink": "int8", "lr": 0.1, "round_timeout": 20.0}
        cfg.update(round_cfg)
        self.model = FederatedModel.load(model_dir / "model")
        self.engine = RoundEngine(self.model, FedAvg(), RoundConfig(**cfg))  # type: ignore[arg-type]
        self.service = CoordinatorService(self.engine, self.transport, rounds, wait_timeout=120)
        self.agents: dict[str, AgentService] = {}
        for i, dev in enumerate(devices):
            with np.load(model_dir / f"data-{i}.npz") as z:
                x, y = z["x"], z["y"]
            w = DeviceWorker(dev, x, y, root / "state" / dev)
            self.agents[dev] = AgentService(w, self.transport)
        self._threads: list[object] = []

    def start_agents(self) -> None:
        for a in self.agents.values():
            self._threads.append(a.start_thread())

    def start_coordinator(self) -> None:
        self._threads.append(self.service.start_thread())

    def wait_finished(self, timeout: float) -> None:
        if not self.service.finished.wait(timeout):
            raise TimeoutError(f"coordinator not finished after {timeout}s")
        if self.service.error is not None:
            raise self.service.error

    def stop(self) -> None:
        self.service.stop()
        for a in self.agents.values():
            a.stop()
        for t in self._threads:
            t.join(timeout=15)  # type: ignore[attr-defined]
