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

    from . import depthwise_grad, recurrent
    from .pool_ops import onnx_translations

    reg = _registration.ONNXRegistry.from_torchlib(opset_version=max(opset, 18))
    ours = {
        **onnx_translations(),
        **recurrent.onnx_translations(),
        **depthwise_grad.onnx_translations(),
    }
    for target, fn in ours.items():  # our custom ops and their ONNX
        reg.register_op(target, fn)
    return reg


@functools.cache
def _exporter_decomposes() -> frozenset[Any]:
    """Ops torch.onnx decomposes itself before translating (its run_decompositions table)."""
    return frozenset(torch.export.default_decompositions()) | frozenset(
        torch._decomp.decomposition_table
    )


# Left in the graph only when our decomposition declined (non-divisible adaptive max pool):
# the exporter's own decomposition then leaves it too and the translation fails.
_NEVER = frozenset({torch.ops.aten.adaptive_max_pool2d.default})


def _translatable(op: Any) -> bool:
    if op in _NEVER:
        return False
    decomps = registry().get_decomps(op)
    if decomps:  # registered ops are never decomposed by the exporter, even when torchlib
        # has only a complex-valued function (adaptive_max_pool2d): then they fail
        return any(not d.is_complex for d in decomps)
    if op in _exporter_decomposes():
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


# Nearest supported alternative for ops known to stay unsupported (matched on the op name).
ALTERNATIVES = {
    "convolution_backward": "3-D convolutions (Conv3d / ConvTranspose3d) are not supported: "
    "use Conv1d/Conv2d or ConvTranspose1d/2d (any stride, padding, output_padding, dilation "
    "and groups), e.g. fold the depth axis into the channels or the batch",
    "_embedding_bag_backward": "EmbeddingBag supports mode='sum'/'mean' without "
    "scale_grad_by_freq: use one of those, or nn.Embedding + amax",
    "_embedding_bag": "EmbeddingBag supports mode='sum'/'mean': use one of those",
    "mkldnn_rnn_layer": "LSTM with proj_size is not supported: use proj_size=0 + nn.Linear",
    "_thnn_fused_lstm_cell": "use nn.LSTM (decomposed into per-step cell ops)",
    "adaptive_max_pool2d": "AdaptiveMaxPool needs an input size divisible by the output size "
    "(or use AdaptiveAvgPool / MaxPool with an explicit kernel)",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "attention is traced with the math "
    "kernel; call F.scaled_dot_product_attention / nn.MultiheadAttention, not the fused op",
    "avg_pool3d": "use 1-D/2-D pooling",
    "max_pool3d": "use 1-D/2-D pooling",
}


def alternative(op: str) -> str:
    name = op.removeprefix("aten.").split(".")[0]
    return ALTERNATIVES.get(name, "rewrite the layer with supported ops (see train_export docs)")


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
        str(bad[0]),
        layer,
        "no ONNX translation"
        + (f" (also: {bad[1:]})" if bad[1:] else "")
        + f"; nearest supported alternative: {alternative(str(bad[0]))}",
    )
