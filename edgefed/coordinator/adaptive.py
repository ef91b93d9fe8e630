"""Per-device compression from a ladder, so each device's upload fits a time budget (issue 15).

Why a ladder and not a continuous top-k fraction: a handful of specs keeps the fleet's
updates in a few known shapes (metrics stay comparable, aggregation already mixes specs
exactly) and one step down the ladder is a 10x cut, far more than the error of a rate
measured on a real link.

The predicted upload of a spec is the length of a real encoded update of the model
(:func:`spec_bytes` runs the codec once per spec on a seeded random delta: dense int8 sizes
do not depend on the values; top-k ones only through the varint-coded index gaps, a few
bytes per tensor), divided
by the device's uplink rate (bytes/s from acknowledged publishes, reported with its presence
as ``capabilities.uplink_bytes_per_s``; see edgefed.transport.uplink). :func:`choose_spec`
is pure: the least compressed rung whose predicted upload fits ``upload_budget_s``; the most
compressed one when none fits; the first one while the rate is unknown.

Error feedback stays correct across a change of spec: the residual is one dense float32
array per tensor, independent of the spec (edgefed.codec.feedback), so whatever one spec
dropped is carried into the next update whatever spec that uses
(tests/test_adaptive.py checks the invariant over ladder switches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefed.codec import CompressionSpec, UpdateMeta, encode_update

__all__ = [
    "DEFAULT_LADDER",
    "AdaptiveUplink",
    "Choice",
    "choose_spec",
    "parse_ladder",
    "spec_bytes",
    "spec_sizes",
]

DEFAULT_LADDER: tuple[str, ...] = ("int8", "topk:0.1+int8", "topk:0.01+int8", "topk:0.001+int8")


@dataclass(frozen=True)
class Choice:
    spec: str
    predicted_bytes: int
    predicted_s: float | None  # None: the rate is unknown
    fits: bool  # False: even the last rung misses the budget (or the rate is unknown)


def parse_ladder(specs: Sequence[str], where: str = "[compression] ladder") -> tuple[str, ...]:
    """Validate a configured ladder; one line naming the bad entry on error."""
    if isinstance(specs, str) or not isinstance(specs, Sequence) or not specs:
        raise ValueError(f"{where}: expected a non-empty list of compression specs")
    out = []
    for s in specs:
        try:
            CompressionSpec.parse(s)
        except Exception as e:  # CodecError, or a non-string
            raise ValueError(f"{where}: bad spec {s!r}: {getattr(e, 'reason', e)}") from None
        out.append(s)
    return tuple(out)


def spec_bytes(shapes: Mapping[str, tuple[int, ...]], spec: str, seed: int = 0) -> int:
    """Length of an encoded update of a model with these tensor shapes under ``spec``."""
    rng = np.random.default_rng(seed)
    delta = {
        k: rng.standard_normal(math.prod(s)).astype(np.float32).reshape(s)
        for k, s in shapes.items()
    }
    meta = UpdateMeta(1, "size-probe", 1, "r0", kind="delta")
    return len(encode_update(delta, meta, spec))


def spec_sizes(
    shapes: Mapping[str, tuple[int, ...]], ladder: Sequence[str] = DEFAULT_LADDER
) -> dict[str, int]:
    """Encoded size of every rung (compute once per model; the choice then costs nothing)."""
    return {s: spec_bytes(shapes, s) for s in ladder}


def choose_spec(
    sizes: Mapping[str, int] | Sequence[tuple[str, int]],
    rate_bytes_per_s: float | None,
    upload_budget_s: float,
    overhead_bytes: int = 0,
) -> Choice:
    """Pick the first rung (in ladder order) whose upload fits the budget.

    ``sizes``: the ladder in order with each spec's encoded bytes (:func:`spec_sizes`);
    ``overhead_bytes``: added to every prediction (message and frame headers).
    """
    rungs = list(sizes.items()) if isinstance(sizes, Mapping) else list(sizes)
    if not rungs:
        raise ValueError("the compression ladder is empty")
    if not upload_budget_s > 0:
        raise ValueError(f"upload_budget_s must be > 0, got {upload_budget_s}")
    rate = rate_bytes_per_s
    if rate is None or not math.isfinite(rate) or rate <= 0:
        spec, n = rungs[0]
        return Choice(spec, n + overhead_bytes, None, False)
    for spec, n in rungs:
        t = (n + overhead_bytes) / rate
        if t <= upload_budget_s:
            return Choice(spec, n + overhead_bytes, t, True)
    spec, n = rungs[-1]
    return Choice(spec, n + overhead_bytes, (n + overhead_bytes) / rate, False)


class AdaptiveUplink:
    """The coordinator-side hook: ladder sizes computed once for the model, then one choice
    per device from the ``uplink_bytes_per_s`` its presence reported (``capabilities``).

    Meant to be called where a round builds each device's task (``"uplink": ...``)."""

    RATE_KEY = "uplink_bytes_per_s"

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        upload_budget_s: float,
        ladder: Sequence[str] = DEFAULT_LADDER,
        overhead_bytes: int = 256,  # the agent's message envelope and one frame header
    ) -> None:
        if not upload_budget_s > 0:
            raise ValueError(f"[compression] upload_budget_s must be > 0, got {upload_budget_s}")
        self.budget = float(upload_budget_s)
        self.overhead = overhead_bytes
        self.sizes = spec_sizes(shapes, parse_ladder(list(ladder)))

    def spec_for(self, capabilities: Mapping[str, object]) -> Choice:
        rate = capabilities.get(self.RATE_KEY)
        ok = isinstance(rate, (int, float)) and not isinstance(rate, bool)
        return choose_spec(self.sizes, float(rate) if ok else None, self.budget, self.overhead)  # type: ignore[arg-type]
