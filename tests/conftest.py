"""Shared fixtures: real brokers started by the tests themselves.

A test that needs mosquitto FAILS when it is missing (never skips): CI installs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Mosquitto:
    """A running mosquitto on loopback with its own config; restartable for fault tests."""

    port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError(
                "mosquitto is not installed: run tools/test.sh (apt-get install mosquitto)"
            )
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=err
            )
        wait_for_port(self.port)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None


def write_mosquitto_config(directory: Path, port: int, extra: str = "") -> Path:
    """A minimal loopback config. The queue limits are raised because mosquitto's
    default max_queued_messages (1000) silently drops QoS 1 messages."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 0\n"
        "message_size_limit 0\n"
        f"log_dest file {directory / 'mosquitto.log'}\n"
        "log_type error\nlog_type warning\n" + extra
    )
    return conf


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    port = free_port()
    broker = Mosquitto(
        port, write_mosquitto_config(tmp_path / "mosquitto", port), tmp_path / "mosquitto.stderr"
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def embedded_broker() -> Iterator[object]:
    """edgefed's embedded amqtt broker (MQTT 3.1.1) on a free loopback port."""
    from edgefed.transport.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class SecuredMosquitto:
    """A real mosquitto running the config written by ``edgefed broker-config`` (issue 7)."""

    broker: Mosquitto
    tls_port: int
    plain_port: int
    written: object  # edgefed.fleetops.broker_config.Written: passwords, CA path, client certs
    spec: object  # edgefed.fleetops.broker_config.FleetSpec


def start_secured_mosquitto(directory: Path, **spec_changes: object) -> SecuredMosquitto:
    """Generate a fleet's secured config in ``directory`` and start mosquitto on it.

    Default fleet "farm": devices dev-0..dev-3, account "coordinator", observer "dash"; a TLS
    listener (certificate for 127.0.0.1 and localhost) and an authenticated plain listener
    on loopback. As root, mosquitto runs as root (it would drop to user mosquitto otherwise).
    """
    from edgefed.fleetops.broker_config import Device, FleetSpec, write_broker_config

    tls_port, plain_port = free_port(), free_port()
    fields: dict[str, object] = {
        "fleet": "farm",
        "devices": tuple(Device(f"dev-{i}") for i in range(4)),
        "observers": ("dash",),
        "hosts": ("127.0.0.1", "localhost"),
        "bind": "127.0.0.1",
        "tls_port": tls_port,
        "plain_port": plain_port,
        "broker_user": "root" if os.geteuid() == 0 else None,
        "persistence": False,
    }
    fields.update(spec_changes)
    spec = FleetSpec(**fields)  # type: ignore[arg-type]
    written = write_broker_config(spec, directory)
    broker = Mosquitto(tls_port, written.config, directory / "mosquitto.stderr")
    try:
        broker.start()
        wait_for_port(plain_port)
    except BaseException:
        if broker.proc is not None:
            broker.stop(kill=True)
        raise
    return SecuredMosquitto(broker, tls_port, plain_port, written, spec)


@pytest.fixture
def secured_mosquitto(tmp_path: Path) -> Iterator[SecuredMosquitto]:
    """mosquitto with TLS, per-device passwords and ACLs from ``edgefed broker-config``."""
    sm = start_secured_mosquitto(tmp_path / "secured-broker")
    try:
        yield sm
    finally:
        sm.broker.stop()


@pytest.fixture
def secured_mosquitto_factory(tmp_path: Path) -> Iterator[object]:
    """Start more secured brokers with other settings: ``factory(name, **spec_changes)``
    (``name``: a directory under tmp_path, or an absolute path)."""
    started: list[SecuredMosquitto] = []

    def factory(name: str, **spec_changes: object) -> SecuredMosquitto:
        sm = start_secured_mosquitto(tmp_path / name, **spec_changes)
        started.append(sm)
        return sm

    try:
        yield factory
    finally:
        for sm in started:
            sm.broker.stop()


# ---- reliability fault tests (issue 7): a small fleet of real processes --------------------


def _tiny_data(n: int, seed: int) -> tuple[object, object]:
    import numpy as np

    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 10)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64)


@pytest.fixture(scope="session")
def fl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-10-2 MLP exported once per session (FederatedModel.save layout), so coordinator
    processes load it torch-free in a second instead of exporting it again; plus a held-out
    set ``eval.npz`` and per-device data ``data-<i>.npz`` (synthetic: nothing downloads)."""
    import numpy as np
    import torch

    from edgefed.coordinator.model import build_federated_model

    d = tmp_path_factory.mktemp("fl-model")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    x, y = _tiny_data(8, 0)
    fm = build_federated_model(net, (torch.from_numpy(x), torch.from_numpy(y)))
    fm.save(d / "model")
    x, y = _tiny_data(300, 999)
    np.savez(d / "eval.npz", x=x, y=y)
    for i in range(32):
        x, y = _tiny_data(40, i)
        np.savez(d / f"data-{i}.npz", x=x, y=y)
    x, y = _tiny_data(150_000, 77)  # seconds of local training: a device still busy mid-round
    np.savez(d / "data-slow.npz", x=x, y=y)
    return d


class Fleet:
    """Configs, processes and outputs of one coordinator + N agents (real subprocesses:
    ``python -m edgefed coordinator`` and ``python -m device_agent.cli``), for fault tests.
    Every process started is killed by the fixture's teardown."""

    def __init__(self, root: Path, model_dir: Path, url: str, n: int, **coord: object) -> None:
        self.root, self.model_dir, self.url, self.n = root, model_dir, url, n
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.devices = [f"dev-{i}" for i in range(n)]
        self.data: dict[str, Path] = {}  # per-device data file overrides (e.g. a slow device)
        c = {"rounds": 3, "min_devices": n, "fraction": 1.0, "round_timeout": 20.0}
        c.update(coord)
        self.checkpoint = root / "coordinator.ckpt.npz"
        self.metrics = root / "metrics.jsonl"
        lines = ["[coordinator]"]
        lines += [
            f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in c.items()
        ]
        lines += [
            f'checkpoint = "{self.checkpoint}"',
            f'metrics = "{self.metrics}"',
            "wait_timeout = 120",
            "[model]",
            f'dir = "{model_dir / "model"}"',
            "[training]",
            "lr = 0.1",
            "[compression]",
            'uplink = "topk:0.5+int8"',
            "[evaluation]",
            f'dataset = "{model_dir / "eval.npz"}"',
            "[transport]",
            f'url = "{url}"',
            'fleet = "rel"',
            "backoff_min = 0.2",
            "backoff_max = 2.0",
            "keepalive = 5",
        ]
        self.coord_config = root / "coordinator.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.coord_config.write_text("\n".join(lines) + "\n")

    def agent_config(self, dev: str) -> Path:
        i = int(dev.split("-")[1])
        p = self.root / f"{dev}.toml"
        if not p.exists():
            p.write_text(
                "[agent]\n"
                f'device_id = "{dev}"\n'
                f'data = "{self.data.get(dev, self.model_dir / f"data-{i}.npz")}"\n'
                f'state_dir = "{self.root / "state" / dev}"\n'
                "[transport]\n"
                f'url = "{self.url}"\nfleet = "rel"\n'
                "backoff_min = 0.2\nbackoff_max = 2.0\nkeepalive = 5\n"
            )
        return p

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        import sys

        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = "1"
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=log, env=env)
        log.close()
        self.procs[name] = p
        return p

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        # SIGUSR1 dumps every thread's stack into the log (see dump()): a hang is diagnosable.
        code = (
            "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, "
            "all_threads=True); from edgefed.apps.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        args = ["-c", code, "coordinator", "--config", str(self.coord_config)]
        return self._spawn("coordinator", args)

    def dump(self, name: str) -> str:
        """Ask a process started with faulthandler for its stacks; return its log."""
        import signal

        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        return self.log(name)

    def start_agent(self, dev: str) -> subprocess.Popen[bytes]:
        return self._spawn(dev, ["-m", "device_agent.cli", "--config", str(self.agent_config(dev))])

    def start_agents(self) -> None:
        for d in self.devices:
            self.start_agent(d)

    def kill(self, name: str) -> None:
        import signal

        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def rounds(self) -> list[dict[str, object]]:
        import json

        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def wait_rounds(self, k: int, timeout: float) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.rounds()
            if len(r) >= k:
                return r
            c = self.procs.get("coordinator")
            if c is not None and c.poll() is not None and c.returncode != 0:
                raise RuntimeError(f"coordinator exited {c.returncode}:\n{self.log('coordinator')}")
            time.sleep(0.1)
        tail = self.dump("coordinator")[-6000:]
        raise TimeoutError(f"{len(self.rounds())} of {k} rounds after {timeout}s\n{tail}")

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def fleet_factory(tmp_path: Path, fl_model_dir: Path) -> Iterator[object]:
    """``fleet_factory(url, n, **coordinator_keys)`` -> :class:`Fleet`; all processes are
    SIGKILLed at teardown."""
    made: list[Fleet] = []

    def factory(url: str, n: int, **coord: object) -> Fleet:
        f = Fleet(tmp_path / f"fleet{len(made)}", fl_model_dir, url, n, **coord)
        made.append(f)
        return f

    try:
        yield factory
    finally:
        for f in made:
            f.stop_all()


class Watcher:
    """A plain paho subscriber that records (topic, logical payload) of single-frame
    messages (frame header stripped) - the test's own eyes on the broker."""

    def __init__(self, url: str, topics: list[str]) -> None:
        import threading

        import paho.mqtt.client as mqtt

        from edgefed.transport.chunking import HEADER_SIZE

        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{id(self)}")

        def on_connect(c, u, f, rc, p) -> None:  # type: ignore[no-untyped-def]
            for t in topics:
                c.subscribe(t, qos=1)

        def on_message(c, u, msg) -> None:  # type: ignore[no-untyped-def]
            with self._cond:
                self.messages.append((msg.topic, bytes(msg.payload[HEADER_SIZE:])))
                self._cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.connect(host, int(port), 30)
        self.client.loop_start()

    def wait_for(self, pred, timeout: float) -> list[tuple[str, bytes]]:  # type: ignore[no-untyped-def]
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self.messages), timeout):
                raise TimeoutError(f"condition not met in {timeout}s; saw {len(self.messages)}")
            return list(self.messages)

    def json(self, topic_suffix: str) -> list[dict[str, object]]:
        import json

        with self._cond:
            return [json.loads(p) for t, p in self.messages if t.endswith(topic_suffix) and p]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def mqtt_watch() -> Iterator[object]:
    """``mqtt_watch(url, [topic filters])`` -> :class:`Watcher`, closed at teardown."""
    made: list[Watcher] = []

    def factory(url: str, topics: list[str]) -> Watcher:
        w = Watcher(url, topics)
        made.append(w)
        return w

    try:
        yield factory
    finally:
        for w in made:
            w.close()


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


@pytest.fixture
def inproc_fleet(tmp_path: Path, fl_model_dir: Path) -> Iterator[object]:
    """``inproc_fleet(url, ["dev-0", ...], rounds=2, **RoundConfig keys)`` -> InProcFleet;
    all threads stopped at teardown."""
    made: list[InProcFleet] = []

    def factory(url: str, devices: list[str], **cfg: object) -> InProcFleet:
        f = InProcFleet(tmp_path / f"inproc{len(made)}", fl_model_dir, url, devices, **cfg)
        made.append(f)
        return f

    try:
        yield factory
    finally:
        for f in made:
            f.stop()
