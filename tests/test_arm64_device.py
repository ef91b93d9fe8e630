"""A Raspberry Pi in every CI run (issue 16): an emulated Debian 12 arm64 device (the userland
of 64-bit Raspberry Pi OS bookworm, qemu-user through binfmt_misc; see tests/arm64_root.py)
installs the aarch64 wheel from tools/build-wheels.sh into a venv with NO compiler in the root,
runs ``edgefed-agent`` against an x86 ``edgefed coordinator`` and a real mosquitto on loopback
(the chroot shares the network namespace) for two signed rounds of a model defined in a user
file, installs a signed bundle rolled out with ``edgefed bundle publish``, and predicts with
``edgefed-agent predict`` exactly what the same model predicts on x86.

Fails (never skips) when root, debootstrap, qemu-user-static or the binfmt registration is
missing: tools/test.sh installs and registers them. The first run builds the root (minutes,
cached under /var/cache/edgefed-arm64-root); emulated timings say nothing about a Pi's speed.
The footprint figures it prints (venv size, the agent's peak RSS) go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from arm64_root import (
    CACHE,
    cached_root_tarball,
    chroot_cmd,
    chroot_env,
    compilers_found,
    device_root,
    hide_compilers,
    install_wheel,
    run_in,
    tree_bytes,
)
from harness.processes import stop_processes
from harness.wait import wait_until
from onnx import numpy_helper

from edgefed.bundle.builder import build_bundle
from edgefed.bundle.format import Manifest, TensorSpec
from edgefed.bundle.signing import load_signing_key, write_keypair
from edgefed.coordinator.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
VENV = "/opt/edgefed"  # the agent's venv inside the device root
FLEET, DEVICE = "pi", "pi-0"
# A model the package does not ship: the user's own file, as a fleet owner would write it.
USER_MODEL = '''
import torch


class GreenhouseNet(torch.nn.Module):
    """6 sensor readings -> one of 3 ventilation settings."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(6, 12)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))
'''


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    x = r.standard_normal((n, 6)).astype(np.float32)
    w = np.random.default_rng(1234).standard_normal((6, 3)).astype(np.float32)
    return x, (x @ w).argmax(axis=1).astype(np.int64)


def _export_user_model(d: Path) -> Path:
    """Import the user's file and export it with FederatedModel.save (the `[model] dir` the
    coordinator federates)."""
    import torch

    from edgefed.coordinator.model import build_federated_model

    src = d / "greenhouse_model.py"
    src.write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("greenhouse_model", src)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    x, y = _data(8, 0)
    fm = build_federated_model(mod.GreenhouseNet(), (torch.from_numpy(x), torch.from_numpy(y)))
    fm.save(d / "model")
    return d / "model"


def _deployable(inference_onnx: bytes, params: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """The federated inference graph with the final weights baked in as initializers (the
    graph takes them as inputs ``param:<name>``); returns it and its opset."""
    m = onnx.load_from_string(inference_onnx)
    keep = []
    for inp in m.graph.input:
        if ":" in inp.name:
            m.graph.initializer.append(numpy_helper.from_array(params[inp.name.split(":", 1)[1]],
                                                               inp.name))  # fmt: skip
        else:
            keep.append(inp)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return m.SerializeToString(), opset


def _wait(cond, timeout: float, what: str, logs) -> None:  # type: ignore[no-untyped-def]
    try:
        wait_until(cond, timeout, what, interval=0.5)  # each check may read files in the root
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout}s\n{logs()}") from None


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_arm64_device_installs_wheel_federates_and_deploys(
    mosquitto, tmp_path: Path, mqtt_watch
) -> None:
    t0 = time.monotonic()
    # The aarch64 wheel, cross-compiled on this host by the shipped script, built while the
    # root is made or unpacked and the device's venv created.
    dist = tmp_path / "dist"
    env = {**os.environ, "EDGEFED_BUILD_CACHE": str(CACHE / "build")}
    build = subprocess.Popen(
        ["bash", str(ROOT / "tools" / "build-wheels.sh"), "--arch", "aarch64", "--out", str(dist)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    procs: list[subprocess.Popen] = [build]
    try:
        _, built_s = cached_root_tarball()  # fails here, naming what is missing, on a bare host
        host = tmp_path / "host"
        host.mkdir()
        model_dir = _export_user_model(host)
        x_eval, y_eval = _data(200, 99)
        np.savez(host / "eval.npz", x=x_eval, y=y_eval)
        coord_pub = write_keypair(host / "coordinator.key")
        fleet_pub = write_keypair(host / "fleet.key")
        t_export = time.monotonic()
        with device_root(tmp_path / "device") as root:
            try:
                # --- install: the wheel and its dependencies (aarch64 wheels), no compiler
                hide_compilers(root)
                assert compilers_found(root) == []
                run_in(root, "python3", "-m", "venv", VENV)
                t_venv = time.monotonic()
                out, _ = build.communicate(timeout=1200)
                assert build.returncode == 0, f"build-wheels.sh:\n{out[-5000:]}"
                wheels = list(dist.glob("edgefed-*-cp311-cp311-manylinux_*_aarch64.whl"))
                assert len(wheels) == 1, list(dist.iterdir())
                wheel = wheels[0]
                t_wheel = time.monotonic()
                install_wheel(root, wheel, VENV)
                probe = run_in(root, f"{VENV}/bin/python", "-c",
                               "import platform; from edgefed import quant; "
                               "print(platform.machine(), quant.best_isa())").stdout  # fmt: skip
                assert probe.split() == ["aarch64", "neon"], probe
                venv_mb = tree_bytes(root / VENV.lstrip("/")) / 2**20
                t_install = time.monotonic()

                # --- the device's files, as an owner would lay them out on a Pi
                etc = root / "etc" / "edgefed"
                etc.mkdir(parents=True)
                shutil.copy(coord_pub, etc / "coordinator.key.pub")
                shutil.copy(fleet_pub, etc / "fleet.key.pub")
                x_dev, y_dev = _data(120, 1)
                (root / "srv").mkdir(exist_ok=True)
                np.savez(root / "srv" / "data.npz", x=x_dev, y=y_dev)
                (etc / "agent.toml").write_text(
                    f'[agent]\ndevice_id = "{DEVICE}"\ndata = "/srv/data.npz"\n'
                    'state_dir = "/var/lib/edgefed-agent"\nthreads = 1\n'
                    'coordinator_key = "/etc/edgefed/coordinator.key.pub"\n'
                    'bundle_key = "/etc/edgefed/fleet.key.pub"\n'
                    f'[transport]\nurl = "{mosquitto.url}"\nfleet = "{FLEET}"\n'
                    "backoff_min = 0.5\nbackoff_max = 5.0\n"
                )
                ckpt, metrics = host / "coordinator.ckpt.npz", host / "metrics.jsonl"
                (host / "coordinator.toml").write_text(
                    "[coordinator]\nrounds = 2\nmin_devices = 1\nfraction = 1.0\n"
                    "round_timeout = 900\nwait_timeout = 900\n"
                    f'checkpoint = "{ckpt}"\nmetrics = "{metrics}"\n'
                    f'[model]\ndir = "{model_dir}"\n[training]\nlr = 0.1\nbatch_size = 16\n'
                    f'[compression]\nuplink = "int8"\n'
                    f'[evaluation]\ndataset = "{host / "eval.npz"}"\n'
                    f'[security]\nsigning_key = "{host / "coordinator.key"}"\n'
                    f'[transport]\nurl = "{mosquitto.url}"\nfleet = "{FLEET}"\n'
                )
                watch = mqtt_watch(mosquitto.url, [f"edgefed/{FLEET}/presence/+"])
                coord_log, agent_log = host / "coordinator.log", host / "agent.log"

                def logs() -> str:
                    return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-4000:]}"
                                     for p in (coord_log, agent_log) if p.exists())  # fmt: skip

                with open(coord_log, "wb") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "edgefed", "coordinator", "--config",
                         str(host / "coordinator.toml")],
                        stdout=out, stderr=subprocess.STDOUT,
                        env={**os.environ, "OMP_NUM_THREADS": "1"},
                    ))  # fmt: skip
                with open(agent_log, "wb") as out:
                    agent = subprocess.Popen(
                        chroot_cmd(root, f"{VENV}/bin/edgefed-agent", "--config",
                                   "/etc/edgefed/agent.toml"),
                        stdout=out, stderr=subprocess.STDOUT, env=chroot_env(),
                    )  # fmt: skip
                    procs.append(agent)

                # --- the device says what it is
                watch.wait_for(lambda msgs: bool(msgs) and any(p for _, p in msgs), 600)
                caps = next(
                    m for m in watch.json(f"presence/{DEVICE}") if m.get("status") == "online"
                )
                assert caps["capabilities"]["arch"] == "aarch64", caps
                assert caps["capabilities"]["isa"] == "neon", caps

                # --- two rounds: the device's updates are accepted
                def rounds() -> list[dict]:
                    if not metrics.exists():
                        return []
                    return [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()]

                _wait(lambda: len(rounds()) >= 2, 1500, "two federated rounds", logs)
                rss_mb = _peak_rss_mb(agent.pid)  # the qemu-aarch64 process: guest + emulator
                for r in rounds():
                    assert r["participants"] == 1 and r["sampled"] == 1, r
                    assert not r["dropped"], r
                assert procs[0].wait(timeout=120) == 0, logs()
                assert "device pi-0 online (aarch64)" in coord_log.read_text(), logs()
                t_rounds = time.monotonic()

                # --- roll out a signed bundle of the federated model; the device installs it
                ck = load_checkpoint(ckpt)
                assert ck.round == 2
                inference = (model_dir / "full.inference.onnx").read_bytes()
                model_onnx, opset = _deployable(inference, ck.params)
                manifest = Manifest(
                    model_version=f"greenhouse-r{ck.round}",
                    inputs=[TensorSpec("x", ["batch", 6], "float32")],
                    outputs=[TensorSpec("output", ["batch", 3], "float32")],
                    opset=opset,
                )
                blob = host / "greenhouse.efb"
                sk = load_signing_key(host / "fleet.key")
                blob.write_bytes(build_bundle(model_onnx, manifest, signing_key=sk))
                pub = subprocess.run(
                    [sys.executable, "-m", "edgefed", "bundle", "publish", str(blob), "--broker",
                     mosquitto.url, "--fleet", FLEET, "--key", str(fleet_pub), "--wait", DEVICE,
                     "--timeout", "600"],
                    capture_output=True, text=True, timeout=700,
                )  # fmt: skip
                assert pub.returncode == 0, (pub.stdout, pub.stderr, logs())
                rep = json.loads(next(s for s in pub.stdout.splitlines() if s.startswith("{")))
                assert rep["status"] == "installed", rep
                assert rep["model_version"] == manifest.model_version, rep

                # --- the device predicts what x86 predicts with the same bundle
                x_new, _ = _data(9, 5)
                np.save(root / "srv" / "x.npy", x_new)
                run_in(root, f"{VENV}/bin/edgefed-agent", "predict", "--config",
                       "/etc/edgefed/agent.toml", "--input", "/srv/x.npy",
                       "--output", "/srv/y.npy")  # fmt: skip
                arm = np.load(root / "srv" / "y.npy")
                sess = ort.InferenceSession(model_onnx, providers=["CPUExecutionProvider"])
                x86 = sess.run(None, {"x": x_new})[0]
                assert arm.shape == (9, 3)
                np.testing.assert_allclose(arm, x86, rtol=1e-5, atol=1e-6)
                assert (arm.argmax(axis=1) == x86.argmax(axis=1)).all()
                assert agent.poll() is None, logs()  # still serving
                t_end = time.monotonic()
            finally:  # before the root is unmounted
                stop_processes(procs, timeout=30)
    finally:
        stop_processes(procs, timeout=30)

    how = f"built in {built_s:.0f} s" if built_s else "from cache"
    print(
        f"\narm64 device: root {how}; user model exported at {t_export - t0:.0f} s; venv made"
        f" at {t_venv - t0:.0f} s; wheel {wheel.name} {wheel.stat().st_size / 1024:.0f} KiB"
        f" ready at {t_wheel - t0:.0f} s; venv {venv_mb:.0f} MiB, install"
        f" {t_install - t_wheel:.0f} s; 2 rounds {t_rounds - t_install:.0f} s, agent peak RSS"
        f" {rss_mb:.0f} MiB (qemu process); bundle + predict {t_end - t_rounds:.0f} s;"
        f" total {time.monotonic() - t0:.0f} s"
    )
