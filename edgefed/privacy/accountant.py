"""Privacy spent by DP-FedAvg, from Google's ``dp-accounting`` library (coordinator extra).

Why dp-accounting: maintained by the Google DP team (the accountant behind TensorFlow Privacy),
pure Python over numpy/scipy (no torch), offline, and it offers both the RDP accountant (the
standard, slightly loose) and the PLD accountant (tight). Each round is one Poisson-subsampled
Gaussian mechanism with sampling rate ``q`` and noise multiplier ``z``; ``T`` rounds compose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edgefed.privacy.dp_fedavg import DPError


def _check(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise DPError(f"noise_multiplier must be > 0 for a finite epsilon, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise DPError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise DPError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise DPError(f"delta must be in (0, 1), got {delta}")


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    method: str = "rdp",
) -> float:
    """Epsilon at ``delta`` after ``rounds`` of Poisson-sampled Gaussian mechanism.

    ``method``: "rdp" (Renyi DP, the figure most papers quote) or "pld" (privacy loss
    distributions: tighter, slower).
    """
    _check(noise_multiplier, sample_rate, rounds, delta)
    if rounds == 0:
        return 0.0
    import dp_accounting
    from dp_accounting import pld, rdp

    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    event = dp_accounting.SelfComposedDpEvent(event, rounds)
    if method == "rdp":
        acc = rdp.RdpAccountant()
    elif method == "pld":
        acc = pld.PLDAccountant()
    else:
        raise DPError(f"method must be 'rdp' or 'pld', got {method!r}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """Rounds actually run, kept in the coordinator's checkpoint; epsilon on demand.

    Rounds with different ``(z, q)`` are grouped, so the ledger stays small for long runs.
    """

    delta: float
    rounds: dict[tuple[float, float], int] = field(default_factory=dict)

    def record(self, noise_multiplier: float, sample_rate: float) -> None:
        _check(noise_multiplier, sample_rate, 1, self.delta)
        key = (float(noise_multiplier), float(sample_rate))
        self.rounds[key] = self.rounds.get(key, 0) + 1

    def epsilon(self, method: str = "rdp") -> float:
        if method not in ("rdp", "pld"):
            raise DPError(f"method must be 'rdp' or 'pld', got {method!r}")
        if not self.rounds:
            return 0.0
        import dp_accounting
        from dp_accounting import pld, rdp

        acc = rdp.RdpAccountant() if method == "rdp" else pld.PLDAccountant()
        for (z, q), n in self.rounds.items():
            ev = dp_accounting.GaussianDpEvent(z)
            if q < 1:
                ev = dp_accounting.PoissonSampledDpEvent(q, ev)
            acc.compose(dp_accounting.SelfComposedDpEvent(ev, n))
        return float(acc.get_epsilon(self.delta))

    def state(self) -> dict:
        return {"delta": self.delta, "rounds": [[z, q, n] for (z, q), n in self.rounds.items()]}

    @classmethod
    def from_state(cls, state: dict) -> PrivacyLedger:
        try:
            led = cls(float(state["delta"]))
            for z, q, n in state["rounds"]:
                _check(float(z), float(q), int(n), led.delta)
                led.rounds[(float(z), float(q))] = int(n)
        except (KeyError, TypeError, ValueError) as e:
            raise DPError(f"bad privacy ledger state: {e}") from None
        return led
