"""Adaptive L2 norm bounding of client updates (numpy, torch-free).

The fixed bound lives with the strategies (``edgefed.strategies.base.clip_update`` and every
strategy's ``max_update_norm``); this module adds the adaptive one. Why bound at all: a scaled
("boosted") malicious update needs a large norm to move the global model; clipping every update
caps what one device can contribute (Sun et al. 2019, "Can you really backdoor FL?").

Adaptive rule: bound = ``factor`` x the median L2 norm of the most recent ``window`` updates
from *earlier* rounds. Earlier rounds only, so an attacker cannot raise its own round's bound;
the median moves only if more than half of the recent updates are large, so a minority of
attackers cannot inflate it over time either. Until ``min_history`` norms are known, the
``initial`` bound applies if given, else ``factor`` x the median of the current round's norms.
One norm per device per round is kept (a re-validated or redelivered update counts once).

Use with any strategy: ``strategy.norm_bound = AdaptiveNormBound(factor=2.0)``; the strategy's
``validate`` asks :meth:`round_bound` with the round's norms and clips to it, ``aggregate``
calls :meth:`end_round`. Checkpoint :meth:`state` with the strategy's state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np


class NormBoundError(ValueError):
    """Bad configuration or state for the adaptive bound; the message names it."""


class AdaptiveNormBound:
    def __init__(
        self,
        factor: float = 2.0,
        *,
        window: int = 200,
        min_history: int = 5,
        initial: float | None = None,
    ) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise NormBoundError(f"factor must be a positive number, got {factor}")
        if initial is not None and not (math.isfinite(initial) and initial > 0):
            raise NormBoundError(f"initial bound must be a positive number, got {initial}")
        if window < 1 or not 1 <= min_history <= window:
            raise NormBoundError(
                f"need window >= 1 and 1 <= min_history <= window, got {window}, {min_history}"
            )
        self.factor = factor
        self.min_history = min_history
        self.initial = initial
        self._history: deque[float] = deque(maxlen=window)
        self._pending: dict[str, float] = {}
        self.clipped = 0
        self.last_bound: float | None = None

    @property
    def bound(self) -> float | None:
        """The bound from earlier rounds (None while fewer than ``min_history`` norms)."""
        if len(self._history) < self.min_history:
            return None
        med = float(np.median(np.fromiter(self._history, dtype=np.float64)))
        return self.factor * med if med > 0 else None

    def round_bound(self, norms: Mapping[str, float]) -> float | None:
        """Bound for this round's updates (``device id -> L2 norm`` before clipping).

        History-based once warm; during warm-up ``initial`` if set, else ``factor`` x the
        median of this round's own norms (robust while attackers are under half the round).
        The norms are kept (one per device) for :meth:`end_round`.
        """
        finite = {d: float(n) for d, n in norms.items() if math.isfinite(n) and n >= 0}
        self._pending.update(finite)
        bound = self.bound
        if bound is None:
            bound = self.initial
        if bound is None and finite:
            med = float(np.median(np.fromiter(finite.values(), dtype=np.float64)))
            bound = self.factor * med if med > 0 else None
        if bound is not None:
            self.clipped += sum(1 for n in finite.values() if n > bound)
        self.last_bound = bound
        return bound

    def end_round(self) -> None:
        """The round is aggregated: its norms join the history."""
        self._history.extend(self._pending.values())
        self._pending = {}

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state for the coordinator's checkpoint."""
        return {"history": list(self._history), "clipped": self.clipped}

    def load_state(self, state: Mapping[str, Any]) -> None:
        hist = state.get("history", [])
        if not isinstance(hist, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            for x in hist
        ):
            raise NormBoundError("adaptive norm-bound state: history must be a list of norms")
        self._history.clear()
        self._history.extend(float(x) for x in hist)
        self._pending = {}
        self.clipped = int(state.get("clipped", 0))
