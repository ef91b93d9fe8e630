"""Real processes: a coordinator + N agents as subprocesses (fault tests), and stopping
worker processes a test started."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from harness.wait import wait_until


def stop_processes(procs: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM every process still running, then wait; kill whatever ignores it."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


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
            before = len(self.log(name))
            p.send_signal(signal.SIGUSR1)
            # faulthandler writes "Thread 0x... (most recent call first)" per thread; a
            # process too wedged to dump still has its log so far worth showing
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: "most recent call first" in self.log(name)[before:],
                    5.0,
                    f"{name}'s stack dump",
                )
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
        def done() -> list[dict[str, object]] | None:
            r = self.rounds()
            if len(r) >= k:
                return r
            c = self.procs.get("coordinator")
            if c is not None and c.poll() is not None and c.returncode != 0:
                raise RuntimeError(f"coordinator exited {c.returncode}:\n{self.log('coordinator')}")
            return None

        try:
            return wait_until(done, timeout, f"{k} rounds", interval=0.1)
        except TimeoutError:
            tail = self.dump("coordinator")[-6000:]
            got = len(self.rounds())
            raise TimeoutError(f"{got} of {k} rounds after {timeout}s\n{tail}") from None

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)
