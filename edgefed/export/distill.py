"""Supervised training and knowledge distillation (Hinton et al. 2015).

Loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).
The T^2 factor keeps the soft-target gradients on the same scale as the hard-label
ones when T changes. Without labels only the soft term is used (alpha is ignored).
Teacher logits are computed once up front (no augmentation here, so they never change):
distillation then costs about as much as training the student alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Log = Callable[[str], None]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> torch.Tensor:
    if temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError("need temperature > 0 and 0 <= alpha <= 1")
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return torch.cat(out)


def _fit(
    model: nn.Module,
    x: np.ndarray,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    log: Log | None,
    tag: str,
) -> list[float]:
    """Adam + cosine decay per step. loss_fn(logits, batch_indices) -> scalar."""
    if epochs <= 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    xt = torch.from_numpy(x)
    history = []
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = loss_fn(model(xt[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        history.append(total / n)
        if log:
            log(f"{tag} epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")
    model.eval()
    return history


def train_supervised(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    log: Log | None = None,
) -> list[float]:
    """Plain cross-entropy training (stand-in for federated training of the teacher)."""
    yt = torch.from_numpy(y.astype(np.int64))
    return _fit(
        model,
        x,
        lambda logits, idx: F.cross_entropy(logits, yt[idx]),
        epochs,
        lr,
        batch_size,
        seed,
        log,
        "train",
    )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    temperature: float = 4.0,
    alpha: float = 0.7,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    log: Log | None = None,
) -> list[float]:
    """Train ``student`` in place on the teacher's soft targets (+ labels when given)."""
    t_logits = predict_logits(teacher, x)
    yt = None if y is None else torch.from_numpy(y.astype(np.int64))

    def loss_fn(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, t_logits[idx], None if yt is None else yt[idx], temperature, alpha)

    return _fit(student, x, loss_fn, epochs, lr, batch_size, seed, log, "distill")
