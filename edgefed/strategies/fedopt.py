"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): the
mean delta is a pseudo-gradient; the server keeps Adam/Yogi moments per coordinate.

Only covered coordinates are stepped, so a tensor no device trained this round (the body
of a model in a head-only round) keeps both its value and its moments.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefed.strategies.base import LinearStrategy, Params


class _FedOpt(LinearStrategy):
    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        max_update_norm: float | None = None,
    ) -> None:
        super().__init__(max_update_norm)
        if not (server_lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("need server_lr > 0, 0 <= beta1, beta2 < 1, tau > 0")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.m: Params = {}
        self.v: Params = {}

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply_mean(
        self, rnd: int, global_params: Params, mean_delta: Params, covered: Params
    ) -> Params:
        out = {k: v.copy() for k, v in global_params.items()}
        for name, d in mean_delta.items():
            c = covered[name]
            m = self.m.setdefault(name, np.zeros_like(d))
            v = self.v.setdefault(name, np.full_like(d, self.tau**2))
            m_new = self.beta1 * m + (1 - self.beta1) * d
            v_new = self._second_moment(v, d * d)
            m[c] = m_new[c]
            v[c] = v_new[c]
            step = self.server_lr * m / (np.sqrt(v) + self.tau)
            out[name] = out[name] + np.where(c, step, 0).astype(np.float32)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            **{f"m/{k}": v for k, v in self.m.items()},
            **{f"v/{k}": v for k, v in self.v.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m, v = {}, {}
        for key, val in state.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise ValueError(f"{self.name}: unexpected state key {key!r}")
            (m if kind == "m" else v)[name] = np.asarray(val, dtype=np.float32).copy()
        self.m, self.v = m, v


class FedAdam(_FedOpt):
    name = "fedadam"

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * d2
