"""Functional optimizer updates traced into the step graph.

Each optimizer mirrors ``torch.optim`` exactly (the verification gate compares the exported
step against ``torch.optim`` itself, so any drift is caught before a graph ships).
Hyperparameters that change between rounds (lr, Adam's eps) are graph INPUTS; the others are
baked. Adam's eps must be an input: the ONNX optimizer pass run by ``torch.onnx.export`` drops
``x + c`` when ``|c| <= 1e-8`` (see docs/design note), which turns zero-gradient updates into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class SGD:
    """SGD with (Nesterov) momentum and L2 weight decay, as ``torch.optim.SGD(dampening=0)``.

    Momentum buffers start at zero, which equals torch's "first step copies the gradient"
    when dampening is 0 (the only dampening offered, for that reason).
    """

    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("SGD momentum and weight_decay must be >= 0")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")

    name = "sgd"

    @property
    def per_param_state(self) -> tuple[str, ...]:
        return ("momentum",) if self.momentum > 0 else ()

    @property
    def has_step(self) -> bool:
        return False

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: dict[str, list[Tensor]],
        step: Tensor | None,
        lr: Tensor,
        eps: Tensor | None,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]], Tensor | None]:
        new_p: list[Tensor] = []
        new_buf: list[Tensor] = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            d = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum > 0:
                buf = state["momentum"][i] * self.momentum + d
                new_buf.append(buf)
                d = d + self.momentum * buf if self.nesterov else buf
            new_p.append(p - lr * d)
        return new_p, ({"momentum": new_buf} if self.momentum > 0 else {}), None

    def torch_optimizer(self, params: list[Tensor], lr: float, eps: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )

    def load_torch_state(
        self,
        opt: torch.optim.Optimizer,
        params: list[Tensor],
        state: dict[str, list[Tensor]],
        step: float,
    ) -> None:
        if self.momentum > 0:
            for p, b in zip(params, state["momentum"], strict=True):
                opt.state[p]["momentum_buffer"] = b.clone()

    def read_torch_state(
        self, opt: torch.optim.Optimizer, params: list[Tensor]
    ) -> dict[str, list[Tensor]]:
        if self.momentum <= 0:
            return {}
        return {"momentum": [opt.state[p]["momentum_buffer"].detach().clone() for p in params]}


@dataclass(frozen=True)
class Adam:
    """Adam / AdamW as ``torch.optim.Adam`` (``decoupled=True`` gives ``torch.optim.AdamW``).

    State: first/second moments per parameter plus ONE shared float32 step counter (torch
    keeps one per parameter but they are always equal when all parameters step together).
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False

    name = "adam"

    def __post_init__(self) -> None:
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1) or self.eps < 0 or self.weight_decay < 0:
            raise ValueError("Adam needs 0 <= betas < 1, eps >= 0, weight_decay >= 0")

    @property
    def per_param_state(self) -> tuple[str, ...]:
        return ("adam_m", "adam_v")

    @property
    def has_step(self) -> bool:
        return True

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return {"name": self.name, **d}

    def update(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        state: dict[str, list[Tensor]],
        step: Tensor | None,
        lr: Tensor,
        eps: Tensor | None,
    ) -> tuple[list[Tensor], dict[str, list[Tensor]], Tensor | None]:
        assert step is not None and eps is not None
        b1, b2 = self.betas
        new_step = step + 1.0
        bc1 = 1.0 - torch.pow(torch.full_like(new_step, b1), new_step)
        bc2 = 1.0 - torch.pow(torch.full_like(new_step, b2), new_step)
        step_size = lr / bc1
        bc2_sqrt = torch.sqrt(bc2)
        new_p: list[Tensor] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        for p, g, m, v in zip(params, grads, state["adam_m"], state["adam_v"], strict=True):
            if self.weight_decay and self.decoupled:
                p = p * (1.0 - lr * self.weight_decay)
            elif self.weight_decay:
                g = g + self.weight_decay * p
            m2 = m + (g - m) * (1.0 - b1)  # torch uses lerp
            v2 = v * b2 + g * g * (1.0 - b2)
            denom = torch.sqrt(v2) / bc2_sqrt + eps
            new_p.append(p - step_size * (m2 / denom))
            ms.append(m2)
            vs.append(v2)
        return new_p, {"adam_m": ms, "adam_v": vs}, new_step

    def torch_optimizer(self, params: list[Tensor], lr: float, eps: float) -> torch.optim.Optimizer:
        cls = torch.optim.AdamW if self.decoupled else torch.optim.Adam
        return cls(params, lr=lr, betas=self.betas, eps=eps, weight_decay=self.weight_decay)

    def load_torch_state(
        self,
        opt: torch.optim.Optimizer,
        params: list[Tensor],
        state: dict[str, list[Tensor]],
        step: float,
    ) -> None:
        for p, m, v in zip(params, state["adam_m"], state["adam_v"], strict=True):
            opt.state[p].update(
                step=torch.tensor(float(step)), exp_avg=m.clone(), exp_avg_sq=v.clone()
            )

    def read_torch_state(
        self, opt: torch.optim.Optimizer, params: list[Tensor]
    ) -> dict[str, list[Tensor]]:
        return {
            "adam_m": [opt.state[p]["exp_avg"].detach().clone() for p in params],
            "adam_v": [opt.state[p]["exp_avg_sq"].detach().clone() for p in params],
        }


Optimizer = SGD | Adam
