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

``upload_budget_s = "auto"``: the budget follows the fleet's own round time (:func:`auto_budget`).
A sync round lasts as long as its slowest sampled device takes to download its task, train
and upload (plus the broker's latency and the coordinator's aggregation and evaluation):
``T = D + train + U + O``. Every device trains at once, so a slow *link* only changes ``U``:
a round holding it lasts ``T_typical - U_typical + U_slow``. Keeping that within
``budget_ratio`` x the typical round means ``U_slow <= (budget_ratio - 1) x T_typical +
U_typical``; the rule drops the (small, unknown to the coordinator) ``U_typical`` term, so it
errs on the side of compressing more:

    budget = (budget_ratio - 1) x median(wall time of the last AUTO_WINDOW rounds)

A median, not a mean: the rounds that hold the slow device are the long ones, and as long as
they are fewer than half of the recent rounds they cannot raise the budget that lets them be
long (no feedback loop); a mean would. Before any round has finished there is nothing to
measure: every device starts on the first rung, as when its rate is unknown (round 1 ships
the graphs anyway, the same for every choice). A budget this small is not floored: a fleet of
0.1 s rounds really cannot absorb a 2 s upload, and the ladder's last rung bounds the cost.
Async mode has no rounds, so "auto" is refused there (the config says so); give seconds.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefed.codec import CompressionSpec, UpdateMeta, encode_update

__all__ = [
    "AUTO",
    "AUTO_WINDOW",
    "DEFAULT_LADDER",
    "AdaptiveUplink",
    "Choice",
    "auto_budget",
    "choose_spec",
    "parse_ladder",
    "spec_bytes",
    "spec_sizes",
]

DEFAULT_LADDER: tuple[str, ...] = ("int8", "topk:0.1+int8", "topk:0.01+int8", "topk:0.001+int8")
AUTO = "auto"  # upload_budget_s derived from the fleet's round time
AUTO_WINDOW = 20  # recent rounds whose median wall time sets an "auto" budget


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


def auto_budget(
    durations: Sequence[float], budget_ratio: float, window: int = AUTO_WINDOW
) -> float | None:
    """The upload budget that keeps a round holding the slowest link within ``budget_ratio``
    x a typical round: ``(budget_ratio - 1) x`` the median of the last ``window`` round
    durations (seconds; see the module docstring for why). None while nothing is measured
    (no round yet, or only rounds of no measurable length)."""
    if not budget_ratio > 1:
        raise ValueError(f"budget_ratio must be > 1, got {budget_ratio}")
    recent = [float(d) for d in list(durations)[-window:] if math.isfinite(d) and d > 0]
    if not recent:
        return None
    return (budget_ratio - 1) * statistics.median(recent)


class AdaptiveUplink:
    """The coordinator-side hook: ladder sizes computed once for the model, then one choice
    per device from the ``uplink_bytes_per_s`` its presence reported (``capabilities``).

    Meant to be called where a round builds each device's task (``"uplink": ...``).
    ``upload_budget_s``: seconds, or ``"auto"`` (:func:`auto_budget` over the durations fed
    to :meth:`observe_round` after each round)."""

    RATE_KEY = "uplink_bytes_per_s"

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        upload_budget_s: float | str,
        ladder: Sequence[str] = DEFAULT_LADDER,
        overhead_bytes: int = 256,  # the agent's message envelope and one frame header
        budget_ratio: float = 1.5,
        window: int = AUTO_WINDOW,
    ) -> None:
        self.auto = upload_budget_s == AUTO
        if self.auto:
            if not budget_ratio > 1:
                raise ValueError(f"[compression] budget_ratio must be > 1, got {budget_ratio}")
        elif isinstance(upload_budget_s, str) or not upload_budget_s > 0:
            raise ValueError(
                f'[compression] upload_budget_s must be > 0 or "auto", got {upload_budget_s!r}'
            )
        self.fixed = None if self.auto else float(upload_budget_s)
        self.ratio = float(budget_ratio)
        self.window = window
        self.durations: deque[float] = deque(maxlen=window)
        self.overhead = overhead_bytes
        self.sizes = spec_sizes(shapes, parse_ladder(list(ladder)))

    def observe_round(self, seconds: float) -> None:
        """One finished round's wall time (tasks out -> aggregated); feeds an "auto" budget."""
        self.durations.append(float(seconds))

    @property
    def budget(self) -> float | None:
        """The budget the next choices use (seconds); None: "auto" with nothing measured."""
        if self.fixed is not None:
            return self.fixed
        return auto_budget(self.durations, self.ratio, self.window)

    def spec_for(self, capabilities: Mapping[str, object]) -> Choice:
        rate = capabilities.get(self.RATE_KEY)
        ok = isinstance(rate, (int, float)) and not isinstance(rate, bool)
        budget = self.budget
        if budget is None:  # "auto" before the first round: the first rung, as for no rate
            spec, n = next(iter(self.sizes.items()))
            return Choice(spec, n + self.overhead, None, False)
        return choose_spec(self.sizes, float(rate) if ok else None, budget, self.overhead)  # type: ignore[arg-type]
