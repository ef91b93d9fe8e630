"""Find aten ops without an ONNX translation and name the layer they come from.

The traced step graph carries no module metadata (``functional_call`` under ``make_fx``),
so when an unsupported op is found we replay ONE eager forward + backward of the model under
a dispatch mode that applies the same decomposition table and records, for every op, the
leaf module running it: forward ops via module hooks, backward ops via the autograd node
being executed (mapped back to the module whose forward created it).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import UnsupportedOpError

_IGNORED_PREFIXES = ("sym_", "_assert", "_local_scalar_dense")


@functools.cache
def registry(opset: int = 20) -> Any:
    """torch.onnx's torchlib registry plus edgefed's custom ops, built once per process.

    (Building it takes 1.5 s, so not once per export.)
    """
    from torch.onnx._internal.exporter import _registration

    from .pool_ops import onnx_translations

    reg = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, 18))
    for target, fn in onnx_translations().items():  # our custom ops and their ONNX
        reg.register_op(target, fn)
    return reg


@functools.cache
def _exporter_decomposes() -> frozenset[Any]:
    """Ops torch.onnx decomposes itself before translating (its run_decompositions table)."""
    return frozenset(torch.export.default_decompositions()) | frozenset(
        torch._decomp.decomposition_table
    )


def _translatable(op: Any) -> bool:
    if registry().is_registered(op) or op in _exporter_decomposes():
        return True
    return bool(
        torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
    )


def unsupported_ops(gm: torch.fx.GraphModule) -> list[Any]:
    """aten OpOverloads left in the graph that torch.onnx cannot translate, in graph order."""
    bad: list[Any] = []
    for node in gm.graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        if t.namespace != "aten" or t._opname.startswith(_IGNORED_PREFIXES):
            continue
        if t._opname.endswith("_"):  # in-place: torch.export functionalizes it first
            continue
        if not _translatable(t) and t not in bad:
            bad.append(t)
    return bad


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str], node_module: dict[Any, str], table: dict[Any, Any]):
        super().__init__()
        self.stack, self.node_module, self.table = stack, node_module, table
        self.where: dict[Any, str] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        layer = self.stack[-1] if self.stack else None
        if layer is None:
            node = torch._C._current_autograd_node()
            layer = self.node_module.get(node) if node is not None else None
            if node is not None and layer is not None:
                layer = f"{layer} (backward)"
        self.where.setdefault(func, layer or "<loss / outside any module>")
        if func in self.table:
            with self:
                r = self.table[func](*args, **kwargs)
            if r is not NotImplemented:
                return r
        return func(*args, **kwargs)


def locate(model: nn.Module, run: Any, table: dict[Any, Any]) -> dict[Any, str]:
    """Run ``run()`` (forward+backward of model) and map each aten op to a layer name."""
    stack: list[str] = []
    node_module: dict[Any, str] = {}
    handles = []

    def pre(name: str) -> Any:
        return lambda m, a: stack.append(f"{name} ({type(m).__name__})")

    def post(name: str) -> Any:
        def hook(m: nn.Module, a: Any, out: Any) -> None:
            label = stack.pop()
            outs = out if isinstance(out, (tuple, list)) else (out,)
            todo = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn]
            while todo:
                n = todo.pop()
                if n is None or n in node_module:
                    continue
                node_module[n] = label
                todo.extend(nx for nx, _ in n.next_functions if nx is not None)

        return hook

    for name, m in model.named_modules():
        if not list(m.children()):
            handles.append(m.register_forward_pre_hook(pre(name or "<root>")))
            handles.append(m.register_forward_hook(post(name or "<root>")))
    rec = _Recorder(stack, node_module, table)
    try:
        with rec:
            run()
    finally:
        for h in handles:
            h.remove()
    return rec.where


def check_supported(gm: torch.fx.GraphModule, model: nn.Module, run: Any = None) -> None:
    """Raise UnsupportedOpError naming the first unsupported op and its layer."""
    bad = unsupported_ops(gm)
    if not bad:
        return
    layer = "<unknown layer>"
    if run is not None:
        from .decompositions import decomposition_table

        try:
            where = locate(model, run, decomposition_table())
            layer = where.get(bad[0], layer)
        except Exception as e:  # diagnosis is best effort; the error below still names the op
            layer = f"<unknown layer: diagnosis failed: {e}>"
    raise UnsupportedOpError(
        str(bad[0]), layer, "no ONNX translation" + (f" (also: {bad[1:]})" if bad[1:] else "")
    )
