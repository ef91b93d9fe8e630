"""Issue 14, items 4 and 5: roll-out on the secured broker (TLS, passwords, ACLs from
``edgefed broker-config``) of bundles exported from a model in a user file.

``edgefed bundle publish --config accounts/publisher.toml`` (the publisher account has the
roll-out topics only) installs v1 on the fleet; a canary of v2 is evaluated by the canary
devices on their held-out data and promoted to the fleet; a canary of v3 (v2's weights
shuffled: an accuracy regression) is rolled back automatically and never reaches the rest of
the fleet; a bundle for 12 features is refused by devices holding 10, with the reason
reported to the publisher; ``predict`` on mismatched input says so in one line. Connection
failures of ``publish`` (unknown CA, bad password, no broker) are one line each.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from harness.processes import stop_processes
from rollout_helpers import (
    Presence,
    make_bundle,
    reports,
    run_cli,
    shuffled,
    start_agent,
    train,
    user_models,
    write_device_data,
)

from edgefed.bundle.signing import load_signing_key, write_keypair
from edgefed.fleetops.broker_config import Device
from edgefed.transport import TransportConfig

CANARIES = ["dev-0", "dev-1"]
DEVICES = [*CANARIES, "dev-2"]


def _publish(blob: Path, account: Path, pub: Path, *extra: str) -> Any:
    return run_cli(
        "-m", "edgefed", "bundle", "publish", str(blob), "--config", str(account),
        "--key", str(pub), "--timeout", "60", *extra,
    )  # fmt: skip


def test_canary_promote_rollback_and_refusal_on_the_secured_broker(
    secured_mosquitto_factory: Any, tmp_path: Path
) -> None:
    sm = secured_mosquitto_factory(
        "broker",
        devices=(Device("dev-0", ("canary",)), Device("dev-1", ("canary",)), Device("dev-2")),
    )
    accounts = sm.written.directory / "accounts"
    acl = (sm.written.directory / "acl").read_text()
    publisher_block = acl.split("user publisher\n", 1)[1].split("\n\n", 1)[0]
    assert publisher_block.splitlines() == [
        "topic write edgefed/farm/bundle/+",
        "topic read edgefed/farm/bundle-status/+",
    ]

    def table(user: str) -> dict[str, Any]:
        return tomllib.loads((accounts / f"{user}.toml").read_text())["transport"]

    pub = write_keypair(tmp_path / "bundle.key")
    sk = load_signing_key(tmp_path / "bundle.key")
    mm = user_models(tmp_path)
    good = train(mm.make_net())
    better = train(copy.deepcopy(good), steps=100, seed=1)
    bundles = {
        "v1": make_bundle(good, "v1", sk),
        "v2": make_bundle(better, "v2", sk),
        "v3-bad": make_bundle(shuffled(copy.deepcopy(better)), "v3-bad", sk),
        "v4-wide": make_bundle(mm.make_net(12), "v4-wide", sk, features=12),
    }
    files = {}
    for v, blob in bundles.items():
        files[v] = tmp_path / f"{v}.efb"
        files[v].write_bytes(blob)

    procs = []
    for i, d in enumerate(DEVICES):
        data = write_device_data(tmp_path / f"{d}.npz", seed=i)
        group = {"group": "canary"} if d in CANARIES else {}
        t = {**table(d), "backoff_min": 0.2}
        procs.append(start_agent(tmp_path, d, data, t, bundle_key=str(pub), **group))
    watch = Presence(TransportConfig.from_dict(table("dash")))
    publisher = accounts / "publisher.toml"
    try:
        watch.wait_online(DEVICES)

        # v1 to the whole fleet, through the publisher account over TLS
        p = _publish(files["v1"], publisher, pub, "--wait", *DEVICES)
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert [r["status"] for r in reports(p.stdout)] == ["installed"] * 3, p.stdout
        for d in DEVICES:
            watch.wait_bundle(d, "v1")

        # canary v2: evaluated on the canaries' held-out data, promoted to the fleet
        p = _publish(files["v2"], publisher, pub, "--group", "canary", "--promote",
                     "--wait", *CANARIES)  # fmt: skip
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert "PROMOTED v2" in p.stdout, p.stdout
        for r in reports(p.stdout):
            assert r["status"] == "installed" and r["mode"] == "canary", r
            assert r["baseline_version"] == "v1" and r["eval_samples"] == 200, r
            assert r["accuracy"] > 0.85 and r["baseline_accuracy"] > 0.85, r
            assert r["latency_ms_b1"] > 0 and r["baseline_latency_ms"] > 0, r
        watch.wait_bundle("dev-2", "v2")  # the promotion reached the rest of the fleet

        # canary v3 (shuffled weights): rolled back automatically, never promoted
        p = _publish(files["v3-bad"], publisher, pub, "--group", "canary", "--promote",
                     "--wait", *CANARIES)  # fmt: skip
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert "ROLLED BACK v3-bad" in p.stdout and "pp below" in p.stdout, p.stdout
        reps = reports(p.stdout)
        canary, back = reps[:2], reps[2:]
        assert all(r["accuracy"] < r["baseline_accuracy"] - 0.01 for r in canary), canary
        assert sorted(r["device"] for r in back) == CANARIES, p.stdout
        assert all(r["status"] == "rolled_back" and r["model_version"] == "v2" for r in back)
        for d in CANARIES:
            watch.wait_bundle(d, "v2")
        assert watch.last["dev-2"]["bundle_version"] == "v2"

        # a bundle for 12 features: refused by a device whose data has 10, reason reported
        p = _publish(files["v4-wide"], publisher, pub, "--wait", "dev-2")
        assert p.returncode == 1, (p.stdout, p.stderr)
        (r,) = reports(p.stdout)
        assert r["status"] == "refused" and r["model_version"] == "v2", r
        assert "input mismatch" in r["reason"] and "float32[12]" in r["reason"], r
        assert "float32[10]" in r["reason"], r

        # predict: the deployed v2 on matching input; mismatched input is one clear line
        x = np.zeros((3, 10), np.float32)
        np.save(tmp_path / "ok.npy", x)
        np.save(tmp_path / "wide.npy", np.zeros((3, 12), np.float32))
        q = run_cli("-m", "device_agent.cli", "predict", "--config", str(tmp_path / "dev-0.toml"),
                    "--input", str(tmp_path / "ok.npy"))  # fmt: skip
        assert q.returncode == 0 and q.stdout.startswith("model v2:"), (q.stdout, q.stderr)
        q = run_cli("-m", "device_agent.cli", "predict", "--config", str(tmp_path / "dev-0.toml"),
                    "--input", str(tmp_path / "wide.npy"))  # fmt: skip
        assert q.returncode == 2, (q.stdout, q.stderr)
        assert len(q.stderr.strip().splitlines()) == 1 and "Traceback" not in q.stderr, q.stderr
        assert "wide.npy" in q.stderr and "float32[10]" in q.stderr, q.stderr
        assert "float32[12]" in q.stderr, q.stderr
        assert all(proc.poll() is None for proc in procs)  # every agent still serving
    finally:
        watch.close()
        stop_processes(procs)


def test_publish_connection_failures_are_one_line(secured_mosquitto: Any, tmp_path: Path) -> None:
    """Unknown CA, a wrong password and no broker at all: each one line naming the cause,
    after the --connect-timeout (no traceback, no fixed 30 s)."""
    from edgefed.fleetops.certs import make_ca

    pub = write_keypair(tmp_path / "k")
    sk = load_signing_key(tmp_path / "k")
    blob = tmp_path / "b.efb"
    blob.write_bytes(make_bundle(train(user_models(tmp_path).make_net(), steps=5), "v1", sk))
    acc = tomllib.loads(
        (secured_mosquitto.written.directory / "accounts" / "publisher.toml").read_text()
    )["transport"]
    other_ca = make_ca("not the fleet's CA")
    other_ca.write(tmp_path / "other-ca.crt", tmp_path / "other-ca.key")
    cases = {
        "unknown CA": ({**acc, "ca_file": str(tmp_path / "other-ca.crt")}, "TLS"),
        "bad password": ({**acc, "password": "wrong"}, "credentials"),
        "no broker": ({**acc, "url": "mqtts://127.0.0.1:1"}, "unreachable"),
    }
    for name, (table, expect) in cases.items():
        conf = tmp_path / f"{name.replace(' ', '-')}.toml"
        conf.write_text("[transport]\n" + "\n".join(f'{k} = "{v}"' for k, v in table.items()))
        p = _publish(blob, conf, pub, "--connect-timeout", "3")
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, (name, p.stderr)
        assert "Traceback" not in p.stderr and expect in lines[0], (name, lines)
        assert table["url"] in lines[0] and "within 3s" in lines[0], (name, lines)
    p = run_cli("-m", "edgefed", "bundle", "publish", str(blob), "--config", str(tmp_path / "nope"))
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr, p.stderr
