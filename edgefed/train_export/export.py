"""Export ONE training step (forward, loss, backward, optimizer update) to a plain ONNX graph.

Recipe (see /work/shared/design/train-step-export.md): ``make_fx`` in symbolic mode with our
decomposition table traces a flat function ``step(x, y, lr, ..., params, state) -> (loss,
new params, new state)``; ``torch.export`` re-traces that graph with a dynamic batch ``Dim``;
``torch.onnx.export(dynamo=True, external_data=False)`` writes one default-domain ONNX file.
Every step graph passes the verification gate (:mod:`.verify`) before it is returned.

Decisions:
* Trainable parameters, optimizer state and updated BatchNorm statistics are graph inputs
  AND outputs; lr, FedProx mu and Adam eps are scalar inputs (eps: see optimizers.py).
* Frozen parameters are inputs by default (one graph serves every backbone version);
  ``bake_frozen=True`` makes them initializers instead (onnxruntime pre-packs constant conv
  weights: faster, but a re-export per backbone version). The manifest records a sha256 of
  each baked tensor so the device can refuse mismatching weights.
* The step traces the model in train mode (dropout on, BatchNorm updating its running stats)
  unless ``freeze_bn_stats=True`` (BatchNorm uses and keeps its running statistics). The
  inference graph traces eval mode. Modes are restored afterwards.
* ``num_batches_tracked`` is a constant: it only matters for ``BatchNorm(momentum=None)``,
  which is refused with a clear error.
* FedProx adds ``mu * (w - w_global)`` to each trainable gradient (the exact gradient of
  ``mu/2 ||w - w_global||^2``); the ``loss`` output is the data loss only.
"""

from __future__ import annotations

import hashlib
import json
import operator
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import depthwise_grad, nchwc
from .decompositions import decomposition_table
from .diagnose import check_supported, registry
from .errors import TrainExportError
from .fusion import (
    fuse_momentum_into_gemm,
    fuse_sgd_into_gemm,
    relu_mask_before_unpool,
    transposed_linear_forward,
)
from .mutations import remove_inplace
from .optimizers import SGD, Optimizer
from .recurrent import rnn_mode
from .verify import BATCHES, verify_inference, verify_step_variants

FORMAT = "edgefed.train_step/1"
DEFAULT_OPSET = 20
TRACE_BATCH = 8  # example batch used for tracing; != 1 so nothing specialises on size 1
MAX_BATCH = 1 << 20
_TWO_GB = 2**31 - 1
# The onnxscript optimizer made no runtime difference (onnxruntime folds constants itself)
# but costs export time and owns the "x + eps is a no-op" rewrite: off.
OPTIMIZE = False

aten = torch.ops.aten
LossSpec = str | Callable[[Tensor, Tensor], Tensor]
TrainableSpec = None | Iterable[str] | Callable[[str, nn.Parameter], bool]


@dataclass
class StepGraph:
    """An exported training step, its manifest and the matching inference graph."""

    onnx: bytes
    manifest: dict[str, Any]
    inference_onnx: bytes
    initial_params: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def save(self, directory: str | Path) -> Path:
        """Write step.onnx, inference.onnx and manifest.json into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "step.onnx").write_bytes(self.onnx)
        (d / "inference.onnx").write_bytes(self.inference_onnx)
        (d / "manifest.json").write_text(json.dumps(self.manifest, indent=1))
        return d


@dataclass
class _Slot:
    name: str  # ONNX input name
    role: str  # x, y, lr, mu, adam_eps, param, frozen, buffer, state, step, global
    key: str | None
    example: Tensor
    batch: bool = False


_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "mse": torch.nn.functional.mse_loss,
    "l1": torch.nn.functional.l1_loss,
    "huber": torch.nn.functional.huber_loss,
    "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
}


def _loss_fn(loss: LossSpec) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """A loss name (defaults of torch.nn.functional) or a callable (class weights, label
    smoothing, ...: e.g. ``lambda o, y: F.cross_entropy(o, y, weight=w)``)."""
    if callable(loss):
        return getattr(loss, "__name__", "custom"), loss
    if isinstance(loss, str) and loss in _LOSSES:
        return loss, _LOSSES[loss]
    raise ValueError(f"loss must be one of {sorted(_LOSSES)} or a callable, got {loss!r}")


def _resolve_trainable(model: nn.Module, trainable: TrainableSpec) -> list[str]:
    params = dict(model.named_parameters())
    if trainable is None:
        names = [n for n, p in params.items() if p.requires_grad]
    elif callable(trainable):
        names = [n for n, p in params.items() if trainable(n, p)]
    else:
        wanted = list(trainable)
        unknown = [n for n in wanted if n not in params]
        if unknown:
            raise ValueError(f"trainable names not in the model: {unknown}")
        names = [n for n in params if n in set(wanted)]
    if not names:
        raise ValueError("no trainable parameters selected")
    return names


def _updated_buffers(model: nn.Module, freeze_bn_stats: bool) -> set[str]:
    """Buffers a train-mode step rewrites (BatchNorm running statistics)."""
    out: set[str] = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            if m.momentum is None and not freeze_bn_stats:
                raise TrainExportError(
                    f"BatchNorm {mname!r} has momentum=None (cumulative average): unsupported; "
                    "set a momentum (e.g. 0.1) or freeze_bn_stats=True"
                )
            if not freeze_bn_stats:
                prefix = f"{mname}." if mname else ""
                out.update({prefix + "running_mean", prefix + "running_var"})
    return out


def _assert_distinct(tensors: list[Tensor]) -> None:
    """Aliased example inputs collapse into ONE graph input: silently wrong updates."""
    seen: dict[int, int] = {}
    for i, t in enumerate(tensors):
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            raise TrainExportError(
                f"example inputs {seen[ptr]} and {i} share memory; the exporter would merge them "
                "into one graph input (pass distinct tensors, e.g. .clone())"
            )
        seen[ptr] = i


def _tile_batch(t: Tensor, n: int) -> Tensor:
    idx = torch.arange(n) % t.shape[0]
    return t[idx].detach().clone().contiguous()


def _set_modes(model: nn.Module, train: bool, freeze_bn_stats: bool) -> None:
    model.train(train)
    if train and freeze_bn_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _trace_and_export(
    fn: Callable[..., Any],
    slots: list[_Slot],
    output_names: list[str],
    opset: int,
    model: nn.Module,
    run: Callable[[], Any],
    training: bool = True,
) -> tuple[bytes, onnx.ModelProto]:
    """The default-domain graph's bytes, and the traced graph with its lowering markers
    (:mod:`.depthwise_grad`), from which the NCHWc variant is built."""
    examples = [s.example for s in slots]
    _assert_distinct(examples)
    table = decomposition_table(training)
    # mkldnn off: torch's LSTM decomposition otherwise picks the fused mkldnn_rnn_layer op
    # (no ONNX translation) whenever the input does not require grad (always, for data).
    # Math attention: the fused CPU flash-attention kernel's backward has no ONNX translation.
    # rnn_mode: GRU/LSTM/RNN as one hand-written layer each (recurrent.py: fewer, bigger nodes).
    with (
        fx_config.patch(use_duck_shape=False),
        torch.backends.mkldnn.flags(enabled=False),
        sdpa_kernel(SDPBackend.MATH),
        rnn_mode(),
    ):
        fakes = _fake_inputs(slots)
        gm = make_fx(
            fn, decomposition_table=table, tracing_mode="symbolic", _allow_non_fake_inputs=True
        )(*fakes)
    remove_inplace(gm)  # else torch.onnx re-traces the whole program to functionalize
    fuse_momentum_into_gemm(gm)
    fuse_sgd_into_gemm(gm)
    relu_mask_before_unpool(gm)
    if training:  # inference keeps x @ W^T: at batch 1 that is the GEMV-friendly orientation
        transposed_linear_forward(gm)
    gm.graph.eliminate_dead_code()  # e.g. pooling indices an inference graph never reads
    gm.recompile()
    check_supported(gm, model, run)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    dyn = [{0: batch} if s.batch else None for s in slots]
    try:
        ep = torch.export.export(gm, tuple(examples), dynamic_shapes=dyn, strict=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = _onnx_export(ep, tuple(examples), [s.name for s in slots], output_names, opset)
    except TrainExportError:
        raise
    except Exception as e:  # the exporter's errors are long; keep the first lines
        raise TrainExportError(f"ONNX export failed: {str(e)[:2000]}") from e
    assert prog is not None
    traced = prog.model_proto
    proto = depthwise_grad.lower_all(traced)
    _check_graph(proto, [s.name for s in slots], output_names)
    data = proto.SerializeToString()
    if len(data) > _TWO_GB:
        raise TrainExportError(f"graph is {len(data)} bytes: over the 2 GB single-file limit")
    return data, traced


def _fake_inputs(slots: list[_Slot]) -> list[Tensor]:
    """Fake tensors where ONLY the batch dimension is symbolic.

    Plain ``make_fx(tracing_mode="symbolic")`` makes every dimension of every parameter a
    symbol: correct but 5-10x slower to trace and export (sympy everywhere).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    out = []
    for s in slots:
        dims = [DimDynamic.STATIC] * s.example.dim()
        if s.batch:
            dims[0] = DimDynamic.DYNAMIC
        ctx = StatelessSymbolicContext(dynamic_sizes=dims)
        out.append(mode.from_tensor(s.example, symbolic_context=ctx))
    return out


def _onnx_export(
    ep: torch.export.ExportedProgram,
    examples: tuple[Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> Any:
    """torch.onnx.export(dynamo=True), reusing one torchlib registry per process.

    The public entry point rebuilds the registry on every call (~1.5 s); the private
    ``_core.export`` it wraps accepts a registry. Falls back to the public API if it moves.
    """
    try:
        from torch.onnx._internal.exporter import _core
    except ImportError:
        _core = None
    fast = _translate_decomposed(ep, input_names, output_names, opset)
    if fast is not None:
        return fast
    if _core is not None and hasattr(_core, "export"):
        return _core.export(
            ep,
            examples,
            registry=registry(opset),
            input_names=input_names,
            output_names=output_names,
            optimize=OPTIMIZE,
            opset_version=opset,
            verbose=False,
        )
    return torch.onnx.export(
        ep,
        examples,
        dynamo=True,
        external_data=False,
        input_names=input_names,
        output_names=output_names,
        opset_version=opset,
        verbose=False,
    )


def _slices_for_split(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    """``getitem(split_with_sizes(x, sizes, dim), i)`` -> ``slice(x, dim, start, end)``.

    Translated as is, the split yields an ONNX sequence read through a torchlib function
    (non-default domain). False (graph untouched) unless every user is a getitem.
    """
    x, sizes = node.args[0], [int(v) for v in node.args[1]]
    dim = int(node.args[2]) if len(node.args) > 2 else int(node.kwargs.get("dim", 0))
    if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
        return False
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for u in list(node.users):
        i = int(u.args[1])
        with graph.inserting_before(u):
            sl = graph.call_function(aten.slice.Tensor, (x, dim, starts[i], starts[i] + sizes[i]))
            sl.meta = dict(u.meta)
        u.replace_all_uses_with(sl)
        graph.erase_node(u)
    graph.erase_node(node)
    return True


def _translate_decomposed(
    ep: torch.export.ExportedProgram, input_names: list[str], output_names: list[str], opset: int
) -> Any:
    """Translate without torch.onnx's ``run_decompositions`` when nothing needs it.

    Our graph is already decomposed to ops torchlib translates, yet the exporter re-traces the
    whole program to decompose it again: 75% of the export time of an unrolled GRU (250 of
    320 s for 16 steps under load). When every op is registered, run only the exporter's other
    passes (type promotion, assertion removal) and translate. None: use the full path.
    """
    try:
        from torch.onnx._internal.exporter import _core, _fx_passes, _ir_passes
    except ImportError:
        return None
    reg = registry(opset)
    graph = ep.graph_module.graph
    for node in list(graph.nodes):
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        if t == aten.squeeze.dims:  # the one op we met that only run_decompositions lowers
            x, dims = node.args[0], node.args[1]
            rank = len(node.args[0].meta["val"].shape)
            with graph.inserting_before(node):
                for d in sorted((int(d) % rank for d in dims), reverse=True):
                    x = graph.call_function(aten.squeeze.dim, (x, d))
                    x.meta = dict(node.meta)
            node.replace_all_uses_with(x)
            graph.erase_node(node)
        elif t == aten.split_with_sizes.default and _slices_for_split(graph, node):
            continue
        elif not any(not d.is_complex for d in reg.get_decomps(t)):
            return None  # e.g. adaptive_max_pool2d: torchlib has only a complex-valued one
    ep.graph_module.recompile()
    with fx_config.patch(backed_size_oblivious=True):
        gm = ep.graph_module
        _fx_passes.insert_type_promotion_nodes(gm)
        ep._graph_module = _fx_passes.remove_assertion_nodes(gm)
    prog = _core._exported_program_to_onnx_program(ep, registry=reg)
    from torch.onnx._internal._lazy_import import onnxscript_apis

    prog.model = onnxscript_apis.convert_version(prog.model, opset)  # as torch.onnx.export does
    _ir_passes.rename_inputs(prog.model, input_names)
    _ir_passes.rename_outputs(prog.model, output_names)
    return prog


def _check_graph(proto: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> None:
    bad = sorted(
        {f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
    )
    if bad or proto.functions:
        raise TrainExportError(f"non-default-domain ops in the graph: {bad or proto.functions}")
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise TrainExportError(f"initializer {t.name} uses external data")
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != inputs or got_out != outputs:
        raise TrainExportError(f"graph I/O names differ from the plan: {got_in} / {got_out}")


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _io_entry(s: _Slot, feeds: str | None = None) -> dict[str, Any]:
    shape: list[Any] = list(s.example.shape)
    if s.batch:
        shape[0] = "batch"
    d: dict[str, Any] = {
        "name": s.name,
        "role": s.role,
        "key": s.key,
        "shape": shape,
        "dtype": _dtype(s.example),
    }
    if feeds is not None:
        d["feeds"] = feeds
    return d


def export_training_step(
    model: nn.Module,
    example_batch: tuple[Tensor, Tensor],
    loss: LossSpec = "cross_entropy",
    optimizer: Optimizer | None = None,
    trainable: TrainableSpec = None,
    fedprox: bool = False,
    *,
    bake_frozen: bool = False,
    freeze_bn_stats: bool = False,
    opset: int = DEFAULT_OPSET,
    nchwc_alternative: bool = True,
) -> StepGraph:
    """Export one training step of ``model`` and its inference graph; verified before return.

    ``nchwc_alternative``: also embed a gate-verified variant whose depthwise and k x k
    convolutions run onnxruntime's NCHWc kernels (:mod:`.nchwc`); the torch-free trainer
    prefers it after a one-batch check and falls back to the default-domain graph.

    Raises :class:`UnsupportedOpError` (names op and layer), :class:`VerificationError` (the
    ONNX step disagrees with torch autograd + torch.optim), :class:`TrainExportError`.
    """
    optimizer = optimizer or SGD()
    if not isinstance(example_batch, (tuple, list)) or len(example_batch) != 2:
        raise ValueError("example_batch must be a pair (x, y) of tensors")
    x0, y0 = example_batch
    if not isinstance(x0, Tensor) or not isinstance(y0, Tensor) or x0.shape[0] != y0.shape[0]:
        raise ValueError("example_batch must hold two tensors with the same batch size")
    loss_name, loss_fn = _loss_fn(loss)
    tnames = _resolve_trainable(model, trainable)
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    fnames = [n for n in params if n not in set(tnames)]
    upd_bufs = _updated_buffers(model, freeze_bn_stats)
    float_bufs = [n for n, b in buffers.items() if b.is_floating_point()]
    in_bufs = [n for n in float_bufs if n in upd_bufs or not bake_frozen]
    const: dict[str, Tensor] = {n: b.clone() for n, b in buffers.items() if n not in in_bufs}
    if bake_frozen:
        const.update({n: params[n].clone() for n in fnames})
    frozen_in = [] if bake_frozen else fnames
    out_bufs = [n for n in in_bufs if n in upd_bufs]

    xe, ye = _tile_batch(x0, TRACE_BATCH), _tile_batch(y0, TRACE_BATCH)
    slots = [
        _Slot("x", "x", None, xe, True),
        _Slot("y", "y", None, ye, True),
        _Slot("lr", "lr", None, torch.tensor(0.01)),
    ]
    if fedprox:
        slots.append(_Slot("mu", "mu", None, torch.tensor(0.01)))
    if optimizer.has_step:
        slots.append(_Slot("adam_eps", "adam_eps", None, torch.tensor(float(optimizer.eps))))
    slots += [_Slot(f"param:{n}", "param", n, params[n].clone()) for n in tnames]
    slots += [_Slot(f"frozen:{n}", "frozen", n, params[n].clone()) for n in frozen_in]
    slots += [_Slot(f"buffer:{n}", "buffer", n, buffers[n].clone()) for n in in_bufs]
    kinds = optimizer.per_param_state
    slots += [
        _Slot(f"state:{k}:{n}", "state", n, torch.zeros_like(params[n]))
        for k in kinds
        for n in tnames
    ]
    if optimizer.has_step:
        slots.append(_Slot("state:step", "step", None, torch.tensor(0.0)))
    if fedprox:
        slots += [_Slot(f"global:{n}", "global", n, params[n].clone()) for n in tnames]
    index = {s.name: i for i, s in enumerate(slots)}

    def step(*flat: Tensor) -> tuple[Tensor, ...]:
        def get(name: str) -> Tensor:
            return flat[index[name]]

        x, y, lr = get("x"), get("y"), get("lr")
        with torch.enable_grad():
            tp = [get(f"param:{n}").detach().requires_grad_(True) for n in tnames]
            bufs = {n: get(f"buffer:{n}").clone() for n in in_bufs}
            values: dict[str, Tensor] = dict(zip(tnames, tp, strict=True))
            values.update({n: get(f"frozen:{n}") for n in frozen_in})
            values.update(bufs)
            values.update(const)
            out = torch.func.functional_call(model, values, (x,))
            lval = loss_fn(out, y)
            grads = torch.autograd.grad(lval, tp, allow_unused=True, materialize_grads=True)
        pv = [t.detach() for t in tp]
        grads = [g.detach() for g in grads]
        if fedprox:
            mu = get("mu")
            grads = [
                g + mu * (p - get(f"global:{n}")) for g, p, n in zip(grads, pv, tnames, strict=True)
            ]
        state = {k: [get(f"state:{k}:{n}") for n in tnames] for k in kinds}
        st = get("state:step") if optimizer.has_step else None
        eps = get("adam_eps") if optimizer.has_step else None
        new_p, new_state, new_step = optimizer.update(pv, grads, state, st, lr, eps)
        outs = [lval.detach(), *new_p]
        for k in kinds:
            outs += new_state[k]
        if new_step is not None:
            outs.append(new_step)
        outs += [bufs[n].detach() for n in out_bufs]
        return tuple(outs)

    out_names = ["loss"] + [f"new_param:{n}" for n in tnames]
    out_names += [f"new_state:{k}:{n}" for k in kinds for n in tnames]
    if optimizer.has_step:
        out_names.append("new_state:step")
    out_names += [f"new_buffer:{n}" for n in out_bufs]

    was_training = {m: m.training for m in model.modules()}
    try:
        _set_modes(model, True, freeze_bn_stats)

        def run_step() -> None:  # eager replay, only used to name the layer of a bad op
            ps = [p for n, p in model.named_parameters() if n in set(tnames)]
            lval = loss_fn(model(xe), ye)
            torch.autograd.grad(lval, ps, allow_unused=True)

        step_onnx, traced = _trace_and_export(step, slots, out_names, opset, model, run_step)
        inf_slots = [_Slot("x", "x", None, xe.clone(), True)]
        inf_slots += [_Slot(f"param:{n}", "param", n, params[n].clone()) for n in tnames]
        inf_slots += [_Slot(f"frozen:{n}", "frozen", n, params[n].clone()) for n in frozen_in]
        inf_slots += [_Slot(f"buffer:{n}", "buffer", n, buffers[n].clone()) for n in in_bufs]
        inf_index = {s.name: i for i, s in enumerate(inf_slots)}

        def infer(*flat: Tensor) -> Tensor:
            values = {s.key: flat[inf_index[s.name]] for s in inf_slots if s.key is not None}
            values.update(const)
            return torch.func.functional_call(model, values, (flat[0],))

        _set_modes(model, False, False)
        inf_onnx, _ = _trace_and_export(
            infer, inf_slots, ["output"], opset, model, lambda: model(xe), training=False
        )
        with torch.no_grad():
            sample_out = model(xe[:2])
    finally:
        for m, t in was_training.items():
            m.training = t

    manifest = _manifest(
        slots,
        out_names,
        inf_slots,
        loss_name,
        optimizer,
        tnames,
        fnames,
        in_bufs,
        out_bufs,
        const,
        bake_frozen,
        freeze_bn_stats,
        fedprox,
        opset,
        params,
        buffers,
    )
    if loss_name == "cross_entropy" and sample_out.dim() >= 2:
        manifest["num_classes"] = int(sample_out.shape[1])
    graph = StepGraph(
        step_onnx,
        manifest,
        inf_onnx,
        {n: t.numpy().copy() for n, t in {**params, **{b: buffers[b] for b in float_bufs}}.items()},
    )
    alt = nchwc.nchwc_alternative(traced) if nchwc_alternative else None
    variants = {} if alt is None else {"nchwc": alt.SerializeToString()}
    was_training = {m: m.training for m in model.modules()}
    try:
        worst, alt_results = verify_step_variants(
            graph, model, loss_fn, optimizer, x0, y0, freeze_bn_stats, variants=variants
        )
        worst["inference"] = verify_inference(graph, model, x0)
    finally:
        for m, t in was_training.items():
            m.training = t
    manifest["verification"] = {"batches": list(BATCHES), **worst}
    if "nchwc" in variants:
        _attach_nchwc(graph, variants["nchwc"], alt_results["nchwc"])
    return graph


def _attach_nchwc(graph: StepGraph, alt_bytes: bytes, gate: dict[str, float] | Exception) -> None:
    """Embed the gate-verified NCHWc variant in the step graph (see :mod:`.nchwc`).

    ``gate``: the variant's result from the same gate run as the step graph (same batches,
    same torch reference and tolerances; :func:`.verify.verify_step_variants`). A variant
    that failed it or did not load here is dropped with a warning: the default graph
    alone is a complete step.
    """
    if isinstance(gate, Exception):
        warnings.warn(f"NCHWc step variant dropped: {gate}", stacklevel=3)
        return
    graph.onnx = nchwc.embed(graph.onnx, alt_bytes)
    graph.manifest["alternatives"] = {
        "nchwc": {
            "metadata_key": nchwc.METADATA_KEY,
            "sha256": hashlib.sha256(alt_bytes).hexdigest(),
            "verification": {"batches": list(BATCHES), **gate},
        }
    }


def _manifest(
    slots: list[_Slot],
    out_names: list[str],
    inf_slots: list[_Slot],
    loss_name: str,
    optimizer: Optimizer,
    tnames: list[str],
    fnames: list[str],
    in_bufs: list[str],
    out_bufs: list[str],
    const: dict[str, Tensor],
    bake_frozen: bool,
    freeze_bn_stats: bool,
    fedprox: bool,
    opset: int,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
) -> dict[str, Any]:
    by_name = {s.name: s for s in slots}
    outputs: list[dict[str, Any]] = [
        {"name": "loss", "role": "loss", "key": None, "shape": [], "dtype": "float32"}
    ]
    for o in out_names[1:]:
        src = by_name[o.removeprefix("new_")]
        e = _io_entry(src, feeds=src.name)
        e["name"] = o
        outputs.append(e)
    baked = {
        n: {
            "shape": list(t.shape),
            "dtype": _dtype(t),
            "sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest(),
        }
        for n, t in const.items()
        if n in params or t.is_floating_point()
    }
    return {
        "format": FORMAT,
        "opset": opset,
        "loss": loss_name,
        "optimizer": optimizer.settings(),
        "fedprox": fedprox,
        "bake_frozen": bake_frozen,
        "freeze_bn_stats": freeze_bn_stats,
        "trainable": tnames,
        "frozen": fnames,
        "buffers": in_bufs,
        "updated_buffers": out_bufs,
        "baked": baked,
        "ignored_buffers": sorted(
            n for n, t in const.items() if n not in params and n not in baked
        ),
        "params": {
            n: {"shape": list(t.shape), "dtype": _dtype(t)}
            for n, t in {**params, **{b: buffers[b] for b in in_bufs}}.items()
        },
        "inputs": [_io_entry(s) for s in slots],
        "outputs": outputs,
        "inference": {
            "inputs": [_io_entry(s) for s in inf_slots],
            "outputs": [{"name": "output", "role": "output", "key": None}],
        },
    }
