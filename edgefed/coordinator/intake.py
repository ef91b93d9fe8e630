"""The ONE update checker, shared by the coordinator's round engine and the sharded
aggregator workers: ``accept(device, bytes, round context) -> AcceptedUpdate | Drop``.

Checks, cheapest first, so a late, duplicate or unsampled update is dropped before its
payload is decoded:

1. framing and the :class:`~edgefed.protocol.UpdateHeader` (types, update-id format); a
   device's error report is a ``device error`` drop;
2. the header's device equals the topic's device;
3. the round: none open or an earlier one is ``late``; a later one is ``invalid`` with
   ``retry`` set (a worker holds it until the announcement arrives). Asynchronous mode
   (``ctx.tasks``): the round must be the task the device holds (an earlier one is
   ``late``), and the model version is that task's;
4. the device was sampled (``not sampled this round``);
5. the update was not counted before (``duplicate``; an identical key is marked as a
   redelivery), and the device has not already answered this round;
6. ``num_samples > 0`` and an ``update`` part;
7. the codec decodes it against the model schema (names, shapes, finite values, indices:
   see ``edgefed.codec.wire``), its metadata agrees with the header (round, device, sample
   count, kind ``delta``) and names the model version the task carried;
8. it carries at least one tensor, and only tensors of the device's graph (a head-only
   device must not move the body);
9. :func:`check_decoded`: the same checks ``strategies.validate_update`` makes on a dense
   update, made on the compressed form (no dense copy).

Nothing here changes state: the caller records an accepted update's key (so a later copy
is a duplicate) and hands it to aggregation (``edgefed.coordinator.aggregation``).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field

from edgefed.codec import CodecError, DecodedUpdate, ModelSchema, decode_update
from edgefed.protocol import Drop, DropReason, MessageError, UpdateHeader, unpack

Key = tuple[str, int, str]

__all__ = ["AcceptedUpdate", "HeldTask", "Key", "RoundContext", "accept", "check_decoded"]


@dataclass(frozen=True)
class AcceptedUpdate:
    """A checked update, still in its compressed form."""

    header: UpdateHeader
    update: DecodedUpdate
    message_bytes: int  # the whole message as received
    payload_bytes: int  # of which the codec payload
    payload: bytes = field(repr=False, default=b"")  # kept by workers that may re-add it
    scale: float = 1.0  # set by norm bounding: the update counts as ``scale * update``

    @property
    def device(self) -> str:
        return self.header.device_id

    @property
    def num_samples(self) -> int:
        return self.header.num_samples

    @property
    def key(self) -> Key:
        return self.header.key


@dataclass(frozen=True)
class HeldTask:
    """An asynchronous (FedBuff) task a device holds: everything its update is checked
    against, and what a restarted coordinator needs to accept it (checkpointed, journaled)."""

    round: int  # the task's round field: its dispatch sequence number
    version: int  # the model version it was built on (staleness = current - this)
    graph: str  # the graph id it trains ("full" / "head")
    allowed: frozenset[str]  # tensors its update may carry
    issued: float = 0.0  # collector clock when it went out (expiry after round_timeout)

    @property
    def model_version(self) -> str:
        return f"r{self.version}"


@dataclass
class RoundContext:
    """What the checker needs to know about the open round (built by its owner)."""

    round: int | None  # the open round, None between rounds
    model_version: str
    schema: ModelSchema
    allowed: Mapping[str, frozenset[str]]  # sampled device -> tensors it may send
    answered: Mapping[str, Key] = field(default_factory=dict)  # device -> counted key
    seen: Container[Key] = frozenset()  # keys counted in earlier rounds (and restarts)
    closed: bool = False  # the round stopped taking updates (a worker after the close)
    # Asynchronous (FedBuff) mode: device -> the task it holds; each device answers its
    # own task, whatever buffer is open (``round`` and ``allowed`` unused).
    tasks: Mapping[str, HeldTask] | None = None


def _drop(device: str, reason: DropReason, detail: str = "", **kw: bool) -> Drop:
    return Drop(device, reason, detail, **kw)


def accept(device: str, data: bytes, ctx: RoundContext) -> AcceptedUpdate | Drop:
    """Check one update message from ``device`` (the topic's device) against ``ctx``."""
    bad = DropReason.INVALID
    try:
        header, parts = unpack(data)
        h = UpdateHeader.parse(header)
    except MessageError as e:
        return _drop(device, bad, e.reason)
    if h.error is not None:
        now = ctx.round is not None and h.round == ctx.round and h.device_id == device
        return _drop(device, DropReason.DEVICE_ERROR, h.error, answered=now)
    dev, rnd = h.device_id, h.round
    if dev != device:
        return _drop(device, bad, f"header device {dev!r} != topic device")
    want_version = ctx.model_version
    allowed = ctx.allowed.get(dev)
    if ctx.tasks is not None:
        if h.key in ctx.seen:
            return _drop(dev, DropReason.DUPLICATE, "update already counted", redelivery=True)
        if ctx.closed:  # a worker whose buffer closed: the next one takes it
            return _drop(dev, DropReason.LATE, "buffer closed", retry=True)
        held = ctx.tasks.get(dev)
        if held is None or rnd < held.round:
            return _drop(dev, DropReason.LATE, f"update for task {rnd}, no longer outstanding")
        if rnd > held.round:
            # a worker may see the update before the announcement naming its task
            return _drop(dev, bad, f"update for task {rnd}, which was never sent", retry=True)
        want_version, allowed = held.model_version, held.allowed
    elif ctx.round is None or rnd < ctx.round or (rnd == ctx.round and ctx.closed):
        return _drop(dev, DropReason.LATE, f"update for round {rnd}", retry=ctx.round is None)
    elif rnd > ctx.round:
        return _drop(dev, bad, f"update for future round {rnd}", retry=True)
    if allowed is None:
        return _drop(dev, DropReason.NOT_SAMPLED)
    if h.key in ctx.seen or ctx.answered.get(dev) == h.key:
        return _drop(dev, DropReason.DUPLICATE, "update already counted", redelivery=True)
    if dev in ctx.answered:
        return _drop(dev, DropReason.DUPLICATE, "device already answered this round")
    if h.num_samples <= 0:
        return _drop(dev, bad, f"num_samples must be > 0, got {h.num_samples}")
    if "update" not in parts:
        return _drop(dev, bad, "no update part")
    payload = parts["update"]
    try:
        upd = decode_update(payload, ctx.schema, accept_v1=True)
    except CodecError as e:
        return _drop(dev, bad, e.reason)
    m = upd.meta
    if (m.round, m.device_id, m.num_samples, m.kind) != (rnd, dev, h.num_samples, "delta"):
        return _drop(dev, bad, "codec metadata disagrees with the header")
    if m.model_version != want_version:
        return _drop(dev, bad, f"model version {m.model_version!r}, task had {want_version!r}")
    if not upd.tensors:
        return _drop(dev, bad, "update carries no tensors")
    extra = set(upd.tensors) - allowed
    if extra:
        return _drop(dev, bad, f"tensors outside its graph: {sorted(extra)[:3]}")
    problem = check_decoded(upd, ctx.schema)
    if problem:
        return _drop(dev, bad, problem)
    return AcceptedUpdate(h, upd, len(data), len(payload), payload)


def check_decoded(upd: DecodedUpdate, schema: ModelSchema) -> str | None:
    """``validate_update``'s checks on the compressed form: every tensor is a model tensor
    of the model's shape. Finiteness (values and scales) and index ranges are proved by the
    codec's decoder, which refuses anything else, so they are not scanned twice."""
    for name, t in upd.tensors.items():
        if name not in schema:
            return f"unknown tensor {name!r}"
        if tuple(t.shape) != tuple(schema[name]):
            return f"tensor {name!r} shape {tuple(t.shape)} != {tuple(schema[name])}"
    return None
