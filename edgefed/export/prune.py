"""Structured pruning that removes channels/neurons physically, with torch-pruning.

Why torch-pruning (1.6): it traces the model's dependency graph, so pruning a conv's
output channels also shrinks the following BatchNorm, the next conv's inputs and the
flatten -> Linear input features; it works offline with our torch. Masks would not speed
up onnxruntime: only a physically smaller graph does.

The classifier (the last Linear) is never pruned: its outputs are the classes.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn


def find_classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear classifier to protect from pruning")
    return linears[-1]


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    *,
    ignored: list[str] | None = None,
    copy_model: bool = True,
) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer by group L2 magnitude.

    ``ignored``: names (as in ``named_modules()``) of extra layers to keep whole.
    Returns the pruned model (a deep copy unless ``copy_model`` is False). Accuracy
    drops sharply right after pruning: fine-tune or distill afterwards.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    m = copy.deepcopy(model) if copy_model else model
    m.eval()
    named = dict(m.named_modules())
    missing = [n for n in ignored or [] if n not in named]
    if missing:
        raise ValueError(f"no modules named {missing} to keep unpruned")
    ignore = [find_classifier(m), *(named[n] for n in ignored or [])]
    pruner = tp.pruner.MetaPruner(
        m,
        example_input,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignore,
    )
    pruner.step()
    return m


def width_scaled(model: nn.Module, example_input: torch.Tensor, width: float) -> nn.Module:
    """The teacher with every hidden width times ``width`` (params about width^2).

    Built by pruning a copy of the teacher, so it works for any architecture torch-pruning
    understands and starts from the teacher's largest-magnitude channels (a better start
    for distillation than random weights).
    """
    if not 0.0 < width < 1.0:
        raise ValueError(f"width must be in (0, 1), got {width}")
    return prune_structured(model, example_input, 1.0 - width)
