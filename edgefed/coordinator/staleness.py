"""Staleness weighting of asynchronous (FedBuff) updates: ``s`` = model versions between the
version a device trained on and the version the update is folded into.

Why these three (the FedBuff paper, Nguyen et al. 2022, and FedAsync, Xie et al. 2019):

- ``"poly:a"`` (default ``poly:0.5``): ``1 / (1 + s) ** a``, FedBuff's ``1/sqrt(1+s)``;
- ``"constant"``: every accepted update counts fully (staleness only limits via
  ``max_staleness``);
- ``"hinge:a,b"``: 1 while ``s <= b``, then ``1 / (a * (s - b) + 1)`` (FedAsync's hinge).

The weight multiplies the update itself (its ``scale``), not only its share of the mean:
a buffer of stale updates moves the model less, as in FedBuff's
``x += lr * mean_i(w(s_i) * delta_i)``. Specs are parsed once at start-up; a bad one is a
one-line ``ValueError`` naming the key.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["parse_staleness_weight"]

KEY = "[coordinator] staleness_weight"


def parse_staleness_weight(spec: str) -> Callable[[int], float]:
    """``"poly:0.5"`` / ``"constant"`` / ``"hinge:a,b"`` -> ``weight(staleness)``."""
    want = 'expected "poly:A", "constant" or "hinge:A,B" (A, B >= 0)'
    if not isinstance(spec, str):
        raise ValueError(f"{KEY}: {want}, found {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    try:
        nums = [float(x) for x in arg.split(",")] if arg else []
    except ValueError:
        raise ValueError(f'{KEY}: {want}, found "{spec}"') from None
    if any(not (x >= 0 and x < float("inf")) for x in nums):
        raise ValueError(f'{KEY}: {want}, found "{spec}"')
    if kind == "constant" and not nums:
        return lambda s: 1.0
    if kind == "poly" and len(nums) == 1:
        a = nums[0]
        return lambda s: float((1.0 + max(0, s)) ** -a)
    if kind == "hinge" and len(nums) == 2:
        a, b = nums
        return lambda s: 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
    raise ValueError(f'{KEY}: {want}, found "{spec}"')
