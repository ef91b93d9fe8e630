"""`edgefed broker-config` against a real mosquitto: TLS, passwords and ACLs hold.

Every "cannot" is shown next to a control that can: a forged publish is followed by a legal
one on the same connection, and a subscriber with the rights sees only the legal one (MQTT
delivers one publisher's QoS 1 messages in order, so the forged one would have come first).
"""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from harness.wait import wait_until

from edgefed.apps.cli import main as edgefed_main
from edgefed.fleetops import certs
from edgefed.fleetops.acl import render_acl
from edgefed.fleetops.broker_config import FleetConfigError, load_fleet_toml
from edgefed.fleetops.passwords import hash_password, verify_password
from edgefed.transport.topics import Topics

TOPICS = Topics("farm")
V5, V311 = mqtt.MQTTv5, mqtt.MQTTv311


@dataclass
class Conn:
    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    connack: list = field(default_factory=list)
    disconnects: list = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    pubacks: dict[int, object] = field(default_factory=dict)
    subacks: list = field(default_factory=list)

    def wait_for(self, topic: str, timeout: float = 5.0) -> None:
        """Wait for a message on ``topic``. Used as a barrier after a control message: the
        test's publishes wait for their PUBACK, and mosquitto routes a PUBLISH to every
        subscriber before it acknowledges it and delivers to each in order, so once the
        control (published last) arrived, any message that got through is already here."""
        wait_until(
            lambda: any(t == topic for t, _ in self.messages),
            timeout,
            f"a message on {topic} (got {self.messages})",
        )

    def subscribe(self, *topics: str) -> None:
        n = len(self.subacks)
        for t in topics:
            self.client.subscribe(t, qos=1)
        wait_until(lambda: len(self.subacks) == n + len(topics), 5, "SUBACK")

    def publish(self, topic: str, payload: bytes) -> object:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        wait_until(lambda: info.mid in self.pubacks, 5, f"PUBACK of {topic}")
        return self.pubacks.get(info.mid)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    sm: Any,
    user: str | None,
    password: str | None = None,
    *,
    protocol: int = V311,
    tls: bool = True,
    ca: Path | None = None,
    client_id: str | None = None,
    cert: tuple[Path, Path] | None = None,
    expect_ok: bool = True,
) -> Conn:
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user or "anon", protocol=protocol
    )
    conn = Conn(c)
    if user is not None:
        c.username_pw_set(user, sm.written.passwords[user] if password is None else password)
    if tls:
        kw = {"certfile": str(cert[0]), "keyfile": str(cert[1])} if cert else {}
        c.tls_set(ca_certs=str(ca or sm.written.ca_cert), **kw)

    def on_connect(client, userdata, flags, rc, props) -> None:
        conn.connack.append(rc)
        conn.connected.set()

    c.on_connect = on_connect
    c.on_disconnect = lambda cl, u, f, rc, p: conn.disconnects.append(rc)
    c.on_message = lambda cl, u, m: conn.messages.append((m.topic, m.payload))
    c.on_publish = lambda cl, u, mid, rc, p: conn.pubacks.__setitem__(mid, rc)
    c.on_subscribe = lambda cl, u, mid, rcs, p: conn.subacks.append(rcs)
    c.connect("127.0.0.1", sm.tls_port if tls else sm.plain_port)
    c.loop_start()
    assert conn.connected.wait(5), "no CONNACK"
    if expect_ok:
        assert not conn.connack[0].is_failure, f"{user}: connect refused: {conn.connack[0]}"
    return conn


@pytest.mark.system
@pytest.mark.parametrize("protocol", [V311, V5], ids=["mqtt311", "mqtt5"])
def test_device_cannot_publish_as_another(secured_mosquitto: Any, protocol) -> None:
    sm = secured_mosquitto
    coord = connect(sm, "coordinator", protocol=protocol)
    dev0 = connect(sm, "dev-0", protocol=protocol)
    try:
        coord.subscribe(TOPICS.all_updates, TOPICS.all_presence)
        forged = [
            dev0.publish(TOPICS.update("dev-1"), b"forged update"),
            dev0.publish(TOPICS.presence("dev-2"), b"forged presence"),
            dev0.publish(TOPICS.round, b"forged round"),
            dev0.publish(TOPICS.task("dev-1"), b"forged task"),
        ]
        control = dev0.publish(TOPICS.update("dev-0"), b"real update")
        coord.wait_for(TOPICS.update("dev-0"))  # the control, published last: a barrier
        assert coord.messages == [(TOPICS.update("dev-0"), b"real update")]
        if protocol == V5:  # MQTT 5 tells the publisher; 3.1.1 drops silently
            assert [rc.value for rc in forged] == [0x87] * 4, forged
            assert control.value == 0
    finally:
        dev0.close()
        coord.close()


@pytest.mark.system
def test_device_cannot_read_other_devices_topics(secured_mosquitto: Any) -> None:
    sm = secured_mosquitto
    spy = connect(sm, "dev-1")
    dev0 = connect(sm, "dev-0")
    coord = connect(sm, "coordinator")
    try:
        # dev-1 tries everything: wildcards, another device's update and task, its own task.
        spy.subscribe(
            f"{TOPICS.base}/#", TOPICS.all_updates, TOPICS.update("dev-0"), TOPICS.task("dev-0")
        )
        spy.subscribe(TOPICS.task("dev-1"), TOPICS.round)
        dev0.publish(TOPICS.update("dev-0"), b"dev-0 private update")
        coord.publish(TOPICS.task("dev-0"), b"task for dev-0")
        coord.publish(TOPICS.metrics, b"metrics")
        coord.publish(TOPICS.task("dev-1"), b"task for dev-1")  # controls, published last
        coord.publish(TOPICS.round, b"round 1")
        spy.wait_for(TOPICS.task("dev-1"))
        spy.wait_for(TOPICS.round)  # the controls, published last: a barrier
        assert sorted(spy.messages) == [
            (TOPICS.round, b"round 1"),
            (TOPICS.task("dev-1"), b"task for dev-1"),
        ]
    finally:
        for c in (spy, dev0, coord):
            c.close()


@pytest.mark.system
def test_observer_reads_metrics_only(secured_mosquitto: Any) -> None:
    sm = secured_mosquitto
    dash = connect(sm, "dash", protocol=V5)
    coord = connect(sm, "coordinator", protocol=V5)
    dev0 = connect(sm, "dev-0", protocol=V5)
    try:
        dash.subscribe(f"{TOPICS.base}/#")
        assert dash.publish(TOPICS.round, b"x").value == 0x87
        dev0.publish(TOPICS.update("dev-0"), b"secret update")
        coord.publish(TOPICS.metrics, b'{"round": 1}')
        dash.wait_for(TOPICS.metrics)  # the control, published last: a barrier
        assert dash.messages == [(TOPICS.metrics, b'{"round": 1}')]
    finally:
        for c in (dash, coord, dev0):
            c.close()


@pytest.mark.system
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-loopback"])
def test_unauthenticated_and_wrong_password_rejected(secured_mosquitto: Any, tls: bool) -> None:
    sm = secured_mosquitto
    cases = {
        "anonymous": (None, None),
        "wrong password": ("dev-0", sm.written.passwords["dev-1"]),
        "unknown user": ("mallory", "whatever"),
    }
    for name, (user, pw) in cases.items():
        for protocol in (V311, V5):
            c = connect(sm, user, pw or "", protocol=protocol, tls=tls, expect_ok=False)
            try:
                assert c.connack[0].is_failure, f"{name} was accepted"
                assert c.connack[0].value in (0x04, 0x05, 0x86, 0x87), (name, c.connack[0])
            finally:
                c.close()
    ok = connect(sm, "dev-0", tls=tls)  # control: the right password gets in
    ok.close()


@pytest.mark.system
def test_client_without_the_fleet_ca_fails_tls(secured_mosquitto: Any, tmp_path) -> None:
    sm = secured_mosquitto
    other = certs.make_ca("some other CA")
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(other.cert_pem())
    for ca in (other_ca, None):  # a foreign CA, and the system trust store
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-0")
        c.username_pw_set("dev-0", sm.written.passwords["dev-0"])
        if ca is None:
            c.tls_set()
        else:
            c.tls_set(ca_certs=str(ca))
        with pytest.raises(ssl.SSLCertVerificationError):
            c.connect("127.0.0.1", sm.tls_port)


@pytest.mark.system
def test_server_certificate_is_checked_against_the_host_dialled(secured_mosquitto_factory) -> None:
    sm = secured_mosquitto_factory("localhost-only", hosts=("localhost",))
    for host, ok in (("localhost", True), ("127.0.0.1", False)):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-0")
        c.username_pw_set("dev-0", sm.written.passwords["dev-0"])
        c.tls_set(ca_certs=str(sm.written.ca_cert))
        if ok:
            assert c.connect(host, sm.tls_port) == mqtt.MQTT_ERR_SUCCESS
            c.disconnect()
        else:
            with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
                c.connect(host, sm.tls_port)


@pytest.mark.system
def test_client_id_of_another_device_cannot_take_over_its_session(
    secured_mosquitto: Any,
) -> None:
    sm = secured_mosquitto
    victim = connect(sm, "dev-0")
    thief = connect(sm, "dev-1", client_id="dev-0")  # broker uses the username as client id
    try:
        # a round trip through the victim's connection after the thief's CONNACK: a
        # takeover would have closed it before (mosquitto handles it inside CONNECT)
        assert victim.publish(TOPICS.update("dev-0"), b"still here") is not None
        assert victim.disconnects == [] and victim.client.is_connected()
        thief_again = connect(sm, "dev-1", client_id="something-else")
        # control: the same username twice does replace the old session
        wait_until(lambda: thief.disconnects, 5, "dev-1's first session replaced")
        thief_again.close()
    finally:
        victim.close()
        thief.close()


@pytest.mark.system
def test_will_message_cannot_impersonate(secured_mosquitto: Any) -> None:
    sm = secured_mosquitto
    coord = connect(sm, "coordinator")
    coord.subscribe(TOPICS.all_presence)
    try:
        for target, payload in (("dev-1", b"forged offline"), ("dev-0", b"real offline")):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-0")
            c.username_pw_set("dev-0", sm.written.passwords["dev-0"])
            c.tls_set(ca_certs=str(sm.written.ca_cert))
            c.will_set(TOPICS.presence(target), payload, qos=1)
            c.connect("127.0.0.1", sm.tls_port)
            c.loop(1.0)
            c.socket().close()  # drop without DISCONNECT: the broker sends the Will
            c.loop(0.1)
        # the real Will comes from the later connection: a barrier for the forged one
        coord.wait_for(TOPICS.presence("dev-0"))
        assert coord.messages == [(TOPICS.presence("dev-0"), b"real offline")]
    finally:
        coord.close()


@pytest.mark.system
def test_mutual_tls_requires_a_client_certificate(secured_mosquitto_factory) -> None:
    sm = secured_mosquitto_factory("mtls", client_certs=True, require_client_cert=True)
    cert = sm.written.client_certs["dev-0"]
    connect(sm, "dev-0", cert=cert).close()  # control: with its certificate, dev-0 gets in
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-0")
    c.username_pw_set("dev-0", sm.written.passwords["dev-0"])
    c.tls_set(ca_certs=str(sm.written.ca_cert))
    connack: list = []
    c.on_connect = lambda cl, u, f, rc, p: connack.append(rc)
    # TLS 1.3: the handshake looks done to the client; the broker's alert closes the link
    # as soon as it reads (paho reports a lost connection, no CONNACK ever comes).
    rcs = [c.connect("127.0.0.1", sm.tls_port)] + [c.loop(0.1) for _ in range(10)]
    assert connack == []
    assert mqtt.MQTT_ERR_CONN_LOST in rcs or mqtt.MQTT_ERR_NO_CONN in rcs, rcs
    log = (sm.written.directory / "mosquitto.log").read_text()
    assert "peer did not return a certificate" in log


def test_password_hash_is_mosquittos_format(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pw_file), "alice", "s3cret"], check=True, timeout=10
    )
    user, theirs = pw_file.read_text().strip().split(":", 1)
    assert user == "alice" and theirs.startswith("$7$101$")
    assert verify_password("s3cret", theirs) and not verify_password("s3creT", theirs)
    import base64

    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("s3cret", salt=salt) == theirs  # byte-identical to mosquitto_passwd


def test_cli_writes_files_with_safe_modes_and_keeps_secrets_on_rerun(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        'fleet = "orchard"\nhosts = ["broker.lan", "10.0.0.5"]\ncoordinators = ["coord"]\n'
        '[[devices]]\nid = "pi-01"\ngroups = ["pi4"]\n[[devices]]\nid = "pi-02"\n'
    )
    out = tmp_path / "out"
    assert edgefed_main(["broker-config", "--fleet-file", str(fleet), "--out", str(out)]) == 0
    for secret in ("passwd", "certs/ca.key", "certs/server.key", "accounts/pi-01.toml"):
        assert stat.S_IMODE(os.stat(out / secret).st_mode) == 0o600, secret
    acct = tomllib.loads((out / "accounts" / "pi-01.toml").read_text())["transport"]
    assert acct["url"] == "mqtts://broker.lan:8883" and acct["fleet"] == "orchard"
    ca_before = (out / "certs" / "ca.crt").read_bytes()
    # re-run with one more device: CA and existing passwords are kept, the new one is added
    assert (
        edgefed_main(
            ["broker-config", "--fleet-file", str(fleet), "--out", str(out), "--device", "pi-03"]
        )
        == 0
    )
    again = tomllib.loads((out / "accounts" / "pi-01.toml").read_text())["transport"]
    assert again["password"] == acct["password"]
    assert (out / "certs" / "ca.crt").read_bytes() == ca_before
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert sorted(users) == ["coord", "pi-01", "pi-02", "pi-03", "publisher"]  # roll-out account
    assert "user pi-03\n" in (out / "acl").read_text()


@pytest.mark.parametrize(
    "text, message",
    [
        ('fleet = "a/b"\n[[devices]]\nid = "x"\n', "invalid fleet"),
        ('fleet = "f"\ncolour = 1\n[[devices]]\nid = "x"\n', "unknown fleet config keys"),
        ('[[devices]]\nid = "x+"\n', "invalid account name"),
        ('[[devices]]\nid = "x"\n[[devices]]\nid = "x"\n', "repeated"),
        ('coordinators = ["x"]\n[[devices]]\nid = "x"\n', "repeated"),
        ("tls_port = 70000\n", "tls_port"),
        ("tls_port = true\n", "tls_port must be int"),
        ('[[devices]]\nid = "x"\ngroups = "pi4"\n', "groups must be a list"),
        ("fleet = \n", "cannot read fleet config"),
    ],
)
def test_bad_fleet_config_is_rejected_with_reason(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    with pytest.raises(FleetConfigError, match=message):
        load_fleet_toml(p)


def test_acl_topics_come_from_the_transport_layout() -> None:
    topics = Topics("f", prefix="acme")
    acl = render_acl(topics, ["d1"], ["c"])
    lines = [line.split() for line in acl.splitlines() if line.startswith("topic ")]
    from edgefed.bundle.rollout import bundle_topic, status_topic
    from edgefed.sharding.topics import ShardTopics

    rollout = {bundle_topic(topics), status_topic(topics, "d1")}
    for _, _access, topic in lines:
        assert topic.startswith(topics.base + "/")
        if "+" in topic:
            continue
        if topic.startswith(ShardTopics(topics).agg + "/"):
            ShardTopics(topics).parse(topic)
        elif topic not in rollout:
            topics.parse(topic)  # every concrete topic is one the runtime knows
    assert ["topic", "write", topics.update("d1")] in lines
    assert ["topic", "write", f"{topics.base}/task/+"] in lines


@pytest.mark.system
def test_runtime_transport_runs_on_the_generated_accounts(secured_mosquitto: Any) -> None:
    """The account files written by broker-config are valid [transport] tables for the runtime's
    client: TLS, passwords, protocol probe (anonymous is refused), chunked updates all work."""
    from edgefed.transport.client import MqttClient
    from edgefed.transport.config import TransportConfig

    def config(user: str) -> TransportConfig:
        path = secured_mosquitto.written.directory / "accounts" / f"{user}.toml"
        return TransportConfig.from_dict(tomllib.loads(path.read_text())["transport"])

    coord = MqttClient(
        config("coordinator"), "coordinator", [TOPICS.all_updates, TOPICS.all_presence]
    ).start(15)
    dev = MqttClient(config("dev-0"), "dev-0", [TOPICS.task("dev-0")]).start(15)
    try:
        assert coord.protocol_name == "5" and coord.config.use_tls
        big = os.urandom(700_000)  # 3 chunks of 256 KiB
        dev.publish(TOPICS.update("dev-1"), b"forged")  # dropped by the ACL
        # both directions at once over TLS: paho must never use one SSL socket from two threads
        tasks = threading.Thread(
            target=lambda: [coord.publish(TOPICS.task("dev-0"), b"task %d" % i) for i in range(200)]
        )
        tasks.start()
        for _ in range(5):
            dev.publish(TOPICS.update("dev-0"), big)
        tasks.join(30)
        for _ in range(5):
            got = coord.get(timeout=10)
            assert got is not None and (got.topic, got.payload) == (TOPICS.update("dev-0"), big)
        received = [dev.get(timeout=10) for _ in range(200)]
        assert [m.payload for m in received if m] == [b"task %d" % i for i in range(200)]
        assert coord.get(timeout=0.3) is None
        assert dev.flush(10)
        # the ACL's refusal reached the runtime client as a named, logged refusal
        assert list(dev.refused) == [(TOPICS.update("dev-1"), "Not authorized")]
    finally:
        dev.stop()
        coord.stop()


@pytest.mark.system
def test_oversized_packet_is_refused_by_the_broker(secured_mosquitto_factory: Any) -> None:
    sm = secured_mosquitto_factory("small-packets", max_packet_size=64 * 1024)
    assert "max_packet_size 65536" in sm.written.config.read_text()
    coord = connect(sm, "coordinator")
    dev = connect(sm, "dev-0")  # MQTT 3.1.1: the client does not know the limit, it just sends
    try:
        coord.subscribe(TOPICS.all_updates)
        dev.client.publish(TOPICS.update("dev-0"), os.urandom(100_000), qos=1)
        wait_until(lambda: dev.disconnects, 5, "the broker dropping the oversized sender")
        small = connect(sm, "dev-1")
        small.publish(TOPICS.update("dev-1"), b"x" * 60_000)  # control: under the limit
        coord.wait_for(TOPICS.update("dev-1"))
        assert [t for t, _ in coord.messages] == [TOPICS.update("dev-1")]
        small.close()
    finally:
        dev.close()
        coord.close()


@pytest.mark.system
def test_aggregator_accounts_share_updates_and_still_cannot_forge(
    secured_mosquitto_factory: Any,
) -> None:
    """Sharded aggregators (one account each: use_username_as_clientid means one connection per
    account) read updates through a shared subscription; coordinator rights do not include
    writing device updates."""
    sm = secured_mosquitto_factory("sharded", coordinators=("coordinator", "agg-1", "agg-2"))
    aggs = [connect(sm, a, protocol=V5) for a in ("agg-1", "agg-2")]
    dev = connect(sm, "dev-0", protocol=V5)
    try:
        for a in aggs:
            a.subscribe(f"$share/aggs/{TOPICS.all_updates}")
        for i in range(20):
            assert dev.publish(TOPICS.update("dev-0"), b"u%d" % i).value == 0
        assert aggs[0].publish(TOPICS.update("dev-1"), b"forged").value == 0x87
        wait_until(lambda: sum(len(a.messages) for a in aggs) >= 20, 5, "20 shared updates")
        got = sorted(p for a in aggs for _, p in a.messages)
        assert got == sorted(b"u%d" % i for i in range(20))  # each update exactly once
        assert all(a.messages for a in aggs)  # and both workers got a share
    finally:
        for c in (*aggs, dev):
            c.close()


@pytest.mark.system
def test_production_defaults_start_with_privilege_drop(secured_mosquitto_factory: Any) -> None:
    """As root, the default config drops to user mosquitto: the files it reads or writes
    afterwards (password file, server key, log, persistence) must belong to that user."""
    user = "mosquitto" if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="edgefed-broker-") as d:
        os.chmod(d, 0o755)  # pytest's tmp_path is 0700: user mosquitto could not enter it
        sm = secured_mosquitto_factory(d, broker_user=user, persistence=True)
        c = connect(sm, "dev-0")
        try:
            assert c.publish(TOPICS.presence("dev-0"), b"online") is not None
        finally:
            c.close()
        sm.broker.stop()
        log = (sm.written.directory / "mosquitto.log").read_text()
        assert "as dev-0" in log  # the broker could write its log after dropping privileges
        assert any((sm.written.directory / "data").iterdir())  # and its persistence file


@pytest.mark.system
def test_rollout_and_sharding_topics_under_the_acl(secured_mosquitto_factory: Any) -> None:
    """Roll-out: a device gets its group's bundle (not another group's) and reports only as
    itself. Sharding: a worker account reads updates via $share and publishes its partial,
    which the coordinator reads; a device cannot publish a partial."""
    from edgefed.bundle.rollout import bundle_topic, status_topic
    from edgefed.fleetops.broker_config import Device
    from edgefed.sharding.topics import ShardTopics

    agg = ShardTopics(TOPICS)
    devices = (Device("dev-0", ("canary",)), Device("dev-1"))
    sm = secured_mosquitto_factory("full", devices=devices, aggregators=("agg-1",))
    coord = connect(sm, "coordinator", protocol=V5)
    d0, d1 = connect(sm, "dev-0", protocol=V5), connect(sm, "dev-1", protocol=V5)
    w = connect(sm, "agg-1", protocol=V5)
    try:
        coord.subscribe(f"{TOPICS.base}/bundle-status/+", f"{agg.agg}/partial/+")
        d0.subscribe(bundle_topic(TOPICS, "canary"), bundle_topic(TOPICS, "all"))
        d1.subscribe(bundle_topic(TOPICS, "canary"), bundle_topic(TOPICS, "all"))
        w.subscribe(agg.shared_updates("aggs"))
        assert coord.publish(bundle_topic(TOPICS, "canary"), b"b-canary").value == 0
        assert coord.publish(bundle_topic(TOPICS, "all"), b"b-all").value == 0
        d0.wait_for(bundle_topic(TOPICS, "all"))
        d1.wait_for(bundle_topic(TOPICS, "all"))
        assert sorted(p for _, p in d0.messages) == [b"b-all", b"b-canary"]
        assert [p for _, p in d1.messages] == [b"b-all"]  # not in group canary
        # a report as another device is refused, its own goes through (after it, in order)
        assert d1.publish(status_topic(TOPICS, "dev-0"), b"forged").value == 0x87
        assert d1.publish(status_topic(TOPICS, "dev-1"), b"ok").value == 0
        coord.wait_for(status_topic(TOPICS, "dev-1"))
        # a device cannot publish a partial; the worker reads updates via $share and can
        assert d0.publish(agg.partial("agg-1"), b"forged").value == 0x87
        assert d0.publish(agg.partial("dev-0"), b"forged").value == 0x87
        assert d0.publish(TOPICS.update("dev-0"), b"u0").value == 0
        w.wait_for(TOPICS.update("dev-0"))
        assert w.publish(agg.partial("agg-1"), b"partial").value == 0
        coord.wait_for(agg.partial("agg-1"))
        assert [p for _, p in coord.messages] == [b"ok", b"partial"]
        assert w.publish(agg.partial("agg-2"), b"as another worker").value == 0x87
    finally:
        for c in (coord, d0, d1, w):
            c.close()
