"""Who may read and write which topic: mosquitto ACL rules derived from the fleet's topic layout.

Every topic comes from :class:`edgefed.transport.topics.Topics` (never a string typed here),
so the ACL and the runtime cannot drift apart. Rules per role (least privilege):

* device ``d``: write ``presence/d`` (its Last Will too) and ``update/d``;
  read ``round`` and ``task/d``. It can neither publish as another device nor read another
  device's task or update (mosquitto denies whatever is not listed).
* coordinator: read ``presence/+``, ``update/+``; write ``round``, ``task/+``, ``metrics``;
  read ``round`` and ``metrics`` too (it reads its own retained round after a restart).
  It may not write ``update/+`` or ``presence/+``, so a stolen coordinator password still
  cannot forge device updates.
* observer (dashboards): read ``metrics``, ``round``, ``presence/+``.
* publisher (``edgefed bundle publish``, issue 14): ONLY the roll-out topics: write
  ``bundle/+``, read ``bundle-status/+``. Its own account, so a roll-out never reuses (and
  kicks off, ``use_username_as_clientid``) the coordinator's connection, and a leaked
  publisher password can neither send tasks nor read updates.
* roll-out (issue 6): a device reads ``bundle/all`` and ``bundle/<g>`` for each of its
  groups and writes only ``bundle-status/<d>``; the coordinator writes ``bundle/+`` and reads
  ``bundle-status/+``. Bundles carry their own signature; the ACL keeps reports honest.
* aggregator worker ``w`` (sharding, issue 8): reads the update topics (through its shared
  subscription ``$share/<group>/.../update/+``: mosquitto checks the topic after the share
  prefix), ``agg/round``, ``agg/close``, ``agg/amend/w``; writes ``agg/presence/w`` (its Last
  Will), ``agg/status/w``, ``agg/partial/w``. The coordinator writes ``agg/round``,
  ``agg/close``, ``agg/amend/+`` and reads ``agg/presence/+``, ``agg/status/+``,
  ``agg/partial/+``. A device can write none of ``agg/...``: no forged partial sums.

mosquitto semantics worth knowing: a denied PUBLISH is dropped silently under MQTT 3.1.1
(the client sees a normal PUBACK) and answered with reason code 0x87 "not authorized"
under MQTT 5; a SUBSCRIBE to a topic without read access still gets a SUBACK, but no message
is ever delivered through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgefed.bundle.rollout import ALL, bundle_topic, status_topic
from edgefed.sharding.topics import ShardTopics
from edgefed.transport.topics import Topics, check_name

READ, WRITE, READWRITE = "read", "write", "readwrite"


@dataclass(frozen=True)
class Rule:
    access: str  # read | write | readwrite
    topic: str


def device_rules(topics: Topics, device: str, groups: Iterable[str] = ()) -> list[Rule]:
    return [
        Rule(WRITE, topics.presence(device)),
        Rule(WRITE, topics.update(device)),
        Rule(READ, topics.round),
        Rule(READ, topics.task(device)),
        *(Rule(READ, bundle_topic(topics, g)) for g in dict.fromkeys([ALL, *groups])),
        Rule(WRITE, status_topic(topics, device)),
    ]


def aggregator_rules(topics: Topics, worker: str) -> list[Rule]:
    a = ShardTopics(topics)
    return [
        Rule(READ, topics.all_updates),
        Rule(READ, a.round),
        Rule(READ, a.close),
        Rule(READ, a.amend(worker)),
        Rule(WRITE, a.presence(worker)),
        Rule(WRITE, a.status(worker)),
        Rule(WRITE, a.partial(worker)),
    ]


def coordinator_rules(topics: Topics) -> list[Rule]:
    return [
        Rule(READ, topics.all_presence),
        Rule(READ, topics.all_updates),
        Rule(READWRITE, topics.round),
        Rule(WRITE, _wildcard(topics.task, "+")),
        Rule(READWRITE, topics.metrics),
        Rule(WRITE, _wildcard(lambda g: bundle_topic(topics, g), "+")),
        Rule(READ, _wildcard(lambda d: status_topic(topics, d), "+")),
        Rule(READWRITE, ShardTopics(topics).round),
        Rule(WRITE, ShardTopics(topics).close),
        Rule(WRITE, _wildcard(ShardTopics(topics).amend, "+")),
        Rule(READ, _wildcard(ShardTopics(topics).presence, "+")),
        Rule(READ, _wildcard(ShardTopics(topics).status, "+")),
        Rule(READ, _wildcard(ShardTopics(topics).partial, "+")),
    ]


def publisher_rules(topics: Topics) -> list[Rule]:
    return [
        Rule(WRITE, _wildcard(lambda g: bundle_topic(topics, g), "+")),
        Rule(READ, _wildcard(lambda d: status_topic(topics, d), "+")),
    ]


def observer_rules(topics: Topics) -> list[Rule]:
    return [Rule(READ, topics.metrics), Rule(READ, topics.round), Rule(READ, topics.all_presence)]


def _wildcard(per_device, placeholder: str) -> str:
    """A per-device topic with its device level replaced by ``+``.

    ``Topics`` refuses ``+`` as a device id (rightly), so build it with a safe placeholder and
    swap the last level; the placeholder makes sure the device id is the last level.
    """
    probe = "edgefed-acl-probe"
    topic: str = per_device(probe)
    head, _, last = topic.rpartition("/")
    if last != probe:
        raise RuntimeError(f"topic layout changed: device id is not the last level of {topic!r}")
    return f"{head}/{placeholder}"


def render_acl(
    topics: Topics,
    devices: Iterable[str],
    coordinators: Iterable[str],
    observers: Iterable[str] = (),
    groups: Mapping[str, Iterable[str]] | None = None,  # device -> roll-out groups
    aggregators: Iterable[str] = (),
    publishers: Iterable[str] = (),
) -> str:
    """Text of a mosquitto ``acl_file``: one ``user`` block per account, no ``pattern`` lines.

    Explicit per-user blocks (not ``pattern ... %u``) because a pattern applies to *every*
    account, including the coordinator's, and reading the file then tells an operator exactly
    what each account may do.
    """
    blocks: list[str] = [f"# edgefed ACL for fleet {topics.fleet!r} (generated; do not edit)"]

    def block(user: str, rules: list[Rule]) -> None:
        check_name("account name", user)
        lines = [f"user {user}"] + [f"topic {r.access} {r.topic}" for r in rules]
        blocks.append("\n".join(lines))

    for c in coordinators:
        block(c, coordinator_rules(topics))
    for o in observers:
        block(o, observer_rules(topics))
    for p in publishers:
        block(p, publisher_rules(topics))
    for w in aggregators:
        block(w, aggregator_rules(topics, w))
    for d in devices:
        block(d, device_rules(topics, d, (groups or {}).get(d, ())))
    return "\n\n".join(blocks) + "\n"
