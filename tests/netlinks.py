"""Real constrained links for system tests (issue 15): every device in its own network
namespace, joined by a veth pair to a *hub* namespace where mosquitto and the coordinator run.

Why namespaces and not a proxy on loopback: the agent's TCP stack, paho's keep-alive and
resend logic and the broker's session handling only behave as on a real modem when the
packets really stop. Layout (addresses are private to these namespaces)::

    ns <tag>-hub:  lo (mosquitto on 0.0.0.0:1883, coordinator, the test's watcher)
                   <tag>h<i> 10.200.<i+1>.1/30  --veth--  <tag>d<i> 10.200.<i+1>.2/30  ns <tag>-d<i>

``Link.throttle(bytes_per_s)`` puts a ``tc tbf`` qdisc on the device end (its uplink; the
kernel here has tbf but no netem); ``Link.down()`` / ``up()`` cut the link (packets are
lost, sockets stay open: exactly what a modem losing its carrier does).

Needs root and iproute2 (``ip``, ``tc``; tools/test.sh installs it). Missing tools FAIL the
test. Teardown kills every process the lab started, then deletes its namespaces (which
removes the veths), also when the test failed; namespaces left by a killed earlier run (its
pid in the name is dead) are removed at start.

Run as a script inside the hub (``python netlinks.py watch PORT TOPIC...``) it is the test's
eyes on the broker: one JSON line per frame received (topic, message id, chunk index and
count, length; and the JSON body of single-frame messages such as presence).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.wait import wait_until

FLEET = "links"  # the fleet of LinkFleet
PREFIX = "efl"  # namespace names: efl<pid>-<tag>-hub / -d<i>
BROKER_PORT = 1883  # inside the hub namespace only


def _run(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def require_tools() -> None:
    """Fail (never skip) without root or iproute2."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        tools = ", ".join(missing)
        pytest.fail(f"{tools} not installed: run tools/test.sh (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.fail("network-namespace link tests need root (CI runs as root)")
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: run tools/test.sh (apt-get install mosquitto)")


def _remove_stale() -> None:
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.match(rf"^{PREFIX}(\d+)-", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


@dataclass
class Link:
    """One device's veth pair: ``ns`` holds the device end ``dev_if``."""

    ns: str
    hub_ns: str
    dev_if: str
    hub_if: str
    hub_addr: str
    dev_addr: str

    def throttle(self, bytes_per_s: int, burst: int = 4096) -> None:
        """Token-bucket limit on the device's uplink (its egress). ``latency`` bounds the
        queue: past it packets drop and TCP backs off, as on a congested modem."""
        rate = f"{bytes_per_s * 8}bit"
        _run("tc", "-n", self.ns, "qdisc", "replace", "dev", self.dev_if, "root", "tbf",
             "rate", rate, "burst", str(burst), "latency", "1s")  # fmt: skip

    def unthrottle(self) -> None:
        _run("tc", "-n", self.ns, "qdisc", "del", "dev", self.dev_if, "root")

    def down(self) -> None:
        _run("ip", "-n", self.ns, "link", "set", self.dev_if, "down")

    def up(self) -> None:
        _run("ip", "-n", self.ns, "link", "set", self.dev_if, "up")

    def tx_bytes(self) -> int:
        """Bytes the device end has put on the wire (its uplink, all headers included)."""
        stats = json.loads(_run("ip", "-n", self.ns, "-s", "-j", "link", "show", self.dev_if))
        return int(stats[0]["stats64"]["tx"]["bytes"])

    @property
    def broker_url(self) -> str:
        return f"mqtt://{self.hub_addr}:{BROKER_PORT}"


@dataclass
class NetLab:
    """Namespaces, links and processes of one test; :meth:`close` undoes all of it."""

    root: Path
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}")
    links: dict[str, Link] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.hub = self._namespace("hub")
        _run("ip", "-n", self.hub, "link", "set", "lo", "up")

    def _namespace(self, suffix: str) -> str:
        ns = f"{self.tag}-{suffix}"
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        return ns

    def add_device(self, name: str) -> Link:
        """A namespace for ``name`` joined to the hub by its own /30."""
        i = len(self.links)
        if i >= 250:
            raise ValueError("at most 250 devices per lab")
        ns = self._namespace(f"d{i}")
        short = self.tag[-4:]  # interface names are limited to 15 characters
        hub_if, dev_if = f"l{short}h{i}", f"l{short}d{i}"
        _run("ip", "link", "add", hub_if, "netns", self.hub, "type", "veth",
             "peer", "name", dev_if, "netns", ns)  # fmt: skip
        link = Link(ns, self.hub, dev_if, hub_if, f"10.200.{i + 1}.1", f"10.200.{i + 1}.2")
        _run("ip", "-n", self.hub, "addr", "add", f"{link.hub_addr}/30", "dev", hub_if)
        _run("ip", "-n", ns, "addr", "add", f"{link.dev_addr}/30", "dev", dev_if)
        for n, ifc in ((self.hub, hub_if), (ns, dev_if), (ns, "lo")):
            _run("ip", "-n", n, "link", "set", ifc, "up")
        self.links[name] = link
        return link

    # ---- processes -------------------------------------------------------------------
    def spawn(self, name: str, ns: str, args: list[str]) -> subprocess.Popen[bytes]:
        """Start ``args`` inside ``ns`` (``ip netns exec``), output to ``<root>/<name>.log``."""
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.root / f"{name}.log", "ab") as log:
            p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *args], stdout=log, stderr=log, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def start_broker(self) -> None:
        """mosquitto in the hub, listening on every hub address (only these namespaces)."""
        conf = self.root / "mosquitto.conf"
        conf.write_text(
            "user root\n"
            f"listener {BROKER_PORT} 0.0.0.0\n"
            "allow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 0\nmessage_size_limit 0\n"
            f"log_dest file {self.root / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.spawn("mosquitto", self.hub, [binary, "-c", str(conf)])
        self.wait(lambda: self._listening(), 10, "mosquitto listening in the hub")

    def _listening(self) -> bool:
        cmd = ["ip", "netns", "exec", self.hub, "ss", "-ltnH", f"sport = :{BROKER_PORT}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return bool(r.stdout.strip())

    def watch(self, topics: list[str]) -> Watch:
        """The test's subscriber in the hub (a process running this file as a script)."""
        out = self.root / f"watch{len([p for p in self.procs if p.startswith('watch')])}.jsonl"
        name = out.stem
        self.spawn(name, self.hub, [sys.executable, str(Path(__file__).resolve()), "watch",
                                    str(BROKER_PORT), str(out), *topics])  # fmt: skip
        w = Watch(out)
        self.wait(lambda: out.exists(), 15, "watcher subscribed")
        return w

    def wait(self, cond: Callable[[], object], timeout: float, what: str) -> object:
        """:func:`harness.wait.wait_until` on ``cond``, failing at once if mosquitto died and
        with every process's log on timeout."""

        def ready() -> object:
            broker = self.procs.get("mosquitto")
            if broker is not None and broker.poll() is not None:
                raise RuntimeError(f"mosquitto exited:\n{self.log('mosquitto')}")
            return cond()

        try:
            return wait_until(ready, timeout, what, interval=0.1)
        except TimeoutError as e:
            logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)
            raise TimeoutError(f"{e}\n{logs}") from None

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class LinkFleet:
    """Coordinator (hub namespace) + agents (one namespace each) on a NetLab, all real
    processes driven by config files: ``python -m edgefed coordinator --config`` and
    ``python -m device_agent.cli --config``. ``model`` is a folder holding the exported
    model (``model/``), the evaluation set (``eval.npz``) and one ``data-<i>.npz`` per
    device. Shared by tests/test_constrained_links.py and benchmarks/intermittent_links.py."""

    def __init__(
        self,
        lab: NetLab,
        model: Path,
        n: int,
        agent_transport: str = "",
        compression: str = "",  # extra [compression] lines
        training: str = "lr = 0.1",  # the [training] lines
        uplink: str = "int8",
        agent_lines: dict[str, str] | None = None,  # device -> extra [agent] lines
        **coord: object,
    ) -> None:
        self.lab, self.model = lab, model
        self.agent_lines = agent_lines or {}
        self.devices = [f"dev-{i}" for i in range(n)]
        for d in self.devices:
            lab.add_device(d)
        lab.start_broker()
        self.metrics = lab.root / "metrics.jsonl"
        c: dict[str, object] = {"rounds": 2, "min_devices": n, "fraction": 1.0}
        c["round_timeout"] = 60.0
        c.update(coord)
        lines = ["[coordinator]", *(f"{k} = {json.dumps(v)}" for k, v in c.items())]
        lines += [
            f'checkpoint = "{lab.root / "coordinator.ckpt.npz"}"',
            f'metrics = "{self.metrics}"',
            "wait_timeout = 120",
            "[model]", f'dir = "{model / "model"}"',
            "[training]", training,
            "[compression]", f'uplink = "{uplink}"', compression,
            "[evaluation]", f'dataset = "{model / "eval.npz"}"',
            "[transport]", 'url = "mqtt://127.0.0.1:1883"', f'fleet = "{FLEET}"',
            "backoff_min = 0.2", "backoff_max = 2.0", "keepalive = 5",
        ]  # fmt: skip
        self.coord_config = lab.root / "coordinator.toml"
        self.coord_config.write_text("\n".join(lines) + "\n")
        self.agent_transport = agent_transport

    def start(self) -> None:
        cmd = [sys.executable, "-m", "edgefed", "coordinator", "--config", str(self.coord_config)]
        self.lab.spawn("coordinator", self.lab.hub, cmd)
        for i, d in enumerate(self.devices):
            self.start_agent(i, d)

    def start_agent(self, i: int, dev: str) -> None:
        link = self.lab.links[dev]
        cfg = self.lab.root / f"{dev}.toml"
        cfg.write_text(
            f'[agent]\ndevice_id = "{dev}"\ndata = "{self.model / f"data-{i}.npz"}"\n'
            f'state_dir = "{self.lab.root / "state" / dev}"\n{self.agent_lines.get(dev, "")}\n'
            f'[transport]\nurl = "{link.broker_url}"\nfleet = "{FLEET}"\n'
            f"backoff_min = 0.2\nbackoff_max = 2.0\nkeepalive = 5\n{self.agent_transport}"
        )
        cmd = [sys.executable, "-m", "device_agent.cli", "--config", str(cfg)]
        self.lab.spawn(dev, link.ns, cmd)

    def rounds(self) -> list[dict[str, object]]:
        if not self.metrics.exists():
            return []
        return [json.loads(s) for s in self.metrics.read_text().splitlines() if s.strip()]

    def wait_rounds(self, k: int, timeout: float) -> list[dict[str, object]]:
        self.lab.wait(lambda: len(self.rounds()) >= k, timeout, f"{k} finished rounds")
        return self.rounds()


class Watch:
    """Frames seen by the hub watcher (read from its JSON-lines file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def frames(self) -> list[dict[str, object]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # the last line may be half written
                out.append(json.loads(line))
        return out


@pytest.fixture(name="netlab")
def netlab_fixture(tmp_path: Path) -> Iterator[NetLab]:
    """A :class:`NetLab` torn down (processes killed, namespaces deleted) after the test."""
    require_tools()
    _remove_stale()
    lab = NetLab(tmp_path / "netlab")
    try:
        yield lab
    finally:
        lab.close()


def _watch_main(port: int, out: Path, topics: list[str]) -> None:
    import threading

    import paho.mqtt.client as mqtt

    from edgefed.transport.chunking import _HEADER, HEADER_SIZE

    lock = threading.Lock()
    f = open(out.with_suffix(".tmp"), "a")  # noqa: SIM115 (open for the process's life)
    ready = threading.Event()

    def on_connect(c, u, fl, rc, p) -> None:  # type: ignore[no-untyped-def]
        c.subscribe([(t, 1) for t in topics])

    def on_subscribe(c, u, mid, rcs, p) -> None:  # type: ignore[no-untyped-def]
        ready.set()

    def on_message(c, u, msg) -> None:  # type: ignore[no-untyped-def]
        rec: dict[str, object] = {"t": time.time(), "topic": msg.topic, "len": len(msg.payload)}
        if len(msg.payload) >= HEADER_SIZE:
            _, mid, index, count, total, _ = _HEADER.unpack_from(msg.payload)
            rec.update(mid=mid.hex(), index=index, count=count, total=total)
            if count == 1:
                with contextlib.suppress(ValueError):
                    rec["json"] = json.loads(msg.payload[HEADER_SIZE:])
        with lock:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{os.getpid()}")
    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    if not ready.wait(15):
        sys.exit("watcher: no SUBACK in 15 s")
    os.replace(out.with_suffix(".tmp"), out)  # the file appears once subscribed
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "watch":
        _watch_main(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit("usage: netlinks.py watch PORT OUT.jsonl TOPIC...")
