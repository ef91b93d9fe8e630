"""The verification gate: an exported step must match torch autograd + torch.optim.

Run on fresh random parameters, optimizer state and batches (two batch sizes, one odd; one run
from zero optimizer state = a real first step, one from random state), comparing loss, new
parameters (as updates, relative to their size), new optimizer state and new BatchNorm
statistics. The reference is independent of the traced code: the model copy runs eagerly,
``loss.backward()`` and ``torch.optim`` do the update.

Dropout cannot match torch's RNG, so for verification the graph's RandomUniformLike nodes are
turned into inputs and torch's ``nn.Dropout`` modules are hooked to use the same noise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import VerificationError
from .optimizers import Optimizer

if TYPE_CHECKING:
    from .export import StepGraph

BATCHES = (16, 7)
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3
ABS_TOL = 1e-6


def _noise_inputs(proto_bytes: bytes) -> tuple[bytes, list[str]]:
    """Replace every RandomUniformLike node by a graph input (names in graph order)."""
    proto = onnx.load_from_string(proto_bytes)
    names: list[str] = []
    keep = []
    for node in proto.graph.node:
        if node.op_type in (
            "RandomUniformLike",
            "RandomUniform",
            "RandomNormalLike",
            "RandomNormal",
            "Bernoulli",
            "Multinomial",
        ):
            if node.op_type != "RandomUniformLike":
                raise VerificationError(f"cannot verify a graph with {node.op_type} nodes")
            out = node.output[0]
            names.append(out)
            proto.graph.input.append(
                onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)
            )
        else:
            keep.append(node)
    if names:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return proto.SerializeToString(), names


def _session(data: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _rand_like(t: Tensor, g: torch.Generator, key: str) -> Tensor:
    if not t.is_floating_point():
        return t.clone()
    if key.endswith("running_var"):
        return torch.rand(t.shape, generator=g) + 0.5
    if key.endswith("running_mean"):
        return torch.randn(t.shape, generator=g) * 0.1
    scale = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.1
    return torch.randn(t.shape, generator=g) * scale + float(t.mean()) * 0.5


def _rand_batch(
    x0: Tensor, y0: Tensor, n: int, g: torch.Generator, n_classes: int | None
) -> tuple[Tensor, Tensor]:
    def like(t: Tensor, classes: int | None) -> Tensor:
        shape = (n, *t.shape[1:])
        if t.is_floating_point():
            s = float(t.std()) if t.numel() > 1 else 1.0
            return torch.randn(shape, generator=g) * (s or 1.0) + float(t.mean())
        hi = classes if classes is not None else int(t.max()) + 1
        return torch.randint(int(t.min()) if classes is None else 0, hi, shape, generator=g).to(
            t.dtype
        )

    return like(x0, None), like(y0, n_classes)


class _DropoutNoise(TorchDispatchMode):
    """Makes every dropout of the eager reference use noise we draw and keep, in order.

    Works below autograd, so functional dropout counts too (attention weights inside
    ``nn.MultiheadAttention`` / ``scaled_dot_product_attention``, ``F.dropout``): on CPU
    dropout is ``bernoulli_(1 - p)`` on a fresh tensor (or ``native_dropout``); both are
    replaced by ``u > p`` for a uniform ``u`` that is also fed to the ONNX graph's matching
    RandomUniformLike node (the exporter's dropout is ``rand_like(x) > p``, in trace order).
    The model must run with the math attention kernel (fused CPU kernels draw internally).
    """

    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        self.noise: list[Tensor] = []
        self.g = g

    def _mask(self, shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
        u = torch.rand(shape, generator=self.g)
        self.noise.append(u)
        return (u > p).to(dtype)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten.bernoulli_.float:
            t, keep = args[0], float(args[1] if len(args) > 1 else kwargs.get("p", 0.5))
            return t.copy_(self._mask(t.shape, 1.0 - keep, t.dtype))
        if func is torch.ops.aten.native_dropout.default:
            x, p, train = args
            if not train or p == 0:
                return func(*args, **kwargs)
            mask = self._mask(x.shape, float(p), x.dtype)
            scale = 0.0 if p >= 1 else 1.0 / (1.0 - float(p))
            return x * mask * scale, mask.to(torch.bool)
        if func in (
            torch.ops.aten.bernoulli.default,
            torch.ops.aten.bernoulli.p,
            torch.ops.aten.bernoulli_.Tensor,
        ):
            raise VerificationError(f"cannot verify: the model draws {func} outside dropout")
        return func(*args, **kwargs)


def _rand_state(kind: str, shape: torch.Size, g: torch.Generator, zero: bool) -> Tensor:
    if kind == "adam_v":
        return torch.rand(shape, generator=g) * 1e-3 + 1e-6
    if zero:
        return torch.zeros(shape)
    return torch.randn(shape, generator=g) * 0.05


def _worst(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def verify_step(*args: Any, **kwargs: Any) -> dict[str, float]:
    """Raise VerificationError unless the ONNX step matches torch; return the worst errors.

    Parameters as :func:`verify_step_variants` without ``variants``.
    """
    return verify_step_variants(*args, **kwargs, variants={})[0]


def verify_step_variants(
    graph: StepGraph,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: Optimizer,
    x0: Tensor,
    y0: Tensor,
    freeze_bn_stats: bool,
    *,
    variants: Mapping[str, bytes],
) -> tuple[dict[str, float], dict[str, dict[str, float] | Exception]]:
    """The verification gate for the step graph and, in the same pass, for alternative graphs
    of the same step (same inputs and outputs, e.g. the NCHWc variant).

    Why one pass: each variant gets the SAME gate as the step graph (same batches, same
    torch reference, same tolerances) while torch runs once per batch; a second full gate
    per variant repeated the torch reference for nothing. Raises VerificationError when the
    step graph fails; a variant that fails the gate or does not load is reported as the
    exception in the second result (the caller drops it), with no effect on the step graph.
    """
    man = graph.manifest
    data, noise_names = _noise_inputs(graph.onnx)
    sess = _session(data)
    alts: dict[str, tuple[ort.InferenceSession, list[str]]] = {}
    alt_result: dict[str, dict[str, float] | Exception] = {}
    for key, alt_bytes in variants.items():
        try:
            alt_data, alt_noise = _noise_inputs(alt_bytes)
            alts[key] = (_session(alt_data), alt_noise)
            alt_result[key] = {}
        except Exception as e:  # does not load here: the variant is dropped, not the step
            alt_result[key] = e
    baked = set(man["baked"])
    tnames: list[str] = man["trainable"]
    worst: dict[str, float] = {}
    n_classes = None
    with torch.no_grad():
        model_out = copy.deepcopy(model).eval()(x0[:2])
    if man["loss"] == "cross_entropy" and model_out.dim() >= 2:
        n_classes = int(model_out.shape[1])
    for run, n in enumerate(BATCHES):
        g = torch.Generator().manual_seed(1234 + run)
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
                if name not in baked:
                    t.copy_(_rand_like(t, g, name))
        ref.train()
        if freeze_bn_stats:
            for m in ref.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for name, p in ref.named_parameters():
            p.requires_grad_(name in tnames)
        x, y = _rand_batch(x0, y0, n, g, n_classes)
        lr = 0.3 if run == 0 else 0.05
        eps = float(getattr(optimizer, "eps", 1e-8))
        mu = 0.1
        tp = dict(ref.named_parameters())
        bufs = dict(ref.named_buffers())
        zero_state = run == 0
        # Adam's second moment is never zero here: at v = 0 the update lr*g/(|g|+eps) of a
        # parameter whose true gradient is 0 (a bias before BatchNorm) amplifies float noise
        # of 1e-9 into a full lr step, in torch as in onnxruntime. The v = 0 path (eps) has its
        # own test; here every update stays well conditioned so a small tolerance is meaningful.
        state: dict[str, list[Tensor]] = {
            k: [_rand_state(k, tp[nm].shape, g, zero_state) for nm in tnames]
            for k in optimizer.per_param_state
        }
        step = 0.0 if zero_state else 3.0
        gparams = {
            nm: tp[nm].detach() + torch.randn(tp[nm].shape, generator=g) * 0.05 for nm in tnames
        }
        feed: dict[str, Any] = {}
        for e in man["inputs"]:
            role, key = e["role"], e["key"]
            v: Tensor
            if role == "x":
                v = x
            elif role == "y":
                v = y
            elif role == "lr":
                v = torch.tensor(lr)
            elif role == "mu":
                v = torch.tensor(mu)
            elif role == "adam_eps":
                v = torch.tensor(eps)
            elif role in ("param", "frozen"):
                v = tp[key].detach()
            elif role == "buffer":
                v = bufs[key]
            elif role == "state":
                kind = e["name"].split(":")[1]
                v = state[kind][tnames.index(key)]
            elif role == "step":
                v = torch.tensor(step)
            elif role == "global":
                v = gparams[key]
            else:
                raise VerificationError(f"unknown input role {role}")
            feed[e["name"]] = v.detach().numpy().copy()
        old = {nm: tp[nm].detach().clone() for nm in tnames}

        hooks = _DropoutNoise(g)
        opt = optimizer.torch_optimizer([tp[nm] for nm in tnames], lr, eps)
        if state or step:
            optimizer.load_torch_state(opt, [tp[nm] for nm in tnames], state, step)
        with sdpa_kernel(SDPBackend.MATH), hooks:
            out = ref(x)
        lval = loss_fn(out, y)
        total = lval
        if man["fedprox"]:
            total = lval + (mu / 2) * sum(((tp[nm] - gparams[nm]) ** 2).sum() for nm in tnames)
        opt.zero_grad()
        total.backward()
        opt.step()
        if len(hooks.noise) != len(noise_names):
            raise VerificationError(
                f"graph has {len(noise_names)} random nodes but the model ran "
                f"{len(hooks.noise)} dropouts: cannot verify"
            )
        new_state = optimizer.read_torch_state(opt, [tp[nm] for nm in tnames])
        ref_t = _Reference(lval, tp, old, new_state, bufs, tnames, step)
        problems = _compare(_outputs(sess, feed, noise_names, hooks.noise), ref_t, man, worst)
        if problems:
            raise VerificationError(
                f"exported step disagrees with torch autograd/torch.optim at batch {n}: "
                + "; ".join(problems[:8])
            )
        for key, (alt, alt_noise) in list(alts.items()):
            alt_worst = alt_result[key]
            assert isinstance(alt_worst, dict)
            try:
                res = _outputs(alt, feed, alt_noise, hooks.noise)
                alt_problems = _compare(res, ref_t, man, alt_worst)
            except Exception as e:  # fails to run: dropped like a failed gate
                alt_problems = [f"does not run: {e}"]
            if alt_problems:
                alt_result[key] = VerificationError(
                    f"variant {key} disagrees with torch autograd/torch.optim at batch {n}: "
                    + "; ".join(alt_problems[:8])
                )
                del alts[key]
    return worst, alt_result


def _outputs(
    sess: ort.InferenceSession, feed: dict[str, Any], noise: list[str], drawn: list[Tensor]
) -> dict[str, np.ndarray]:
    """One graph's outputs by name, its random nodes fed the noise torch drew."""
    f = {**feed, **{nm: u.numpy() for nm, u in zip(noise, drawn, strict=True)}}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, f), strict=True))


class _Reference(NamedTuple):
    """torch's result of one verification batch, shared by the step graph and its variants."""

    loss: Tensor
    params: dict[str, nn.Parameter]
    old: dict[str, Tensor]
    state: dict[str, list[Tensor]]
    buffers: dict[str, Tensor]
    trainable: list[str]
    step: float


def _compare(
    res: dict[str, np.ndarray], ref: _Reference, man: dict[str, Any], worst: dict[str, float]
) -> list[str]:
    """The gate's tolerances applied to one graph's outputs; updates ``worst`` in place."""
    tp, old, new_state, bufs, tnames, step = (
        ref.params, ref.old, ref.state, ref.buffers, ref.trainable, ref.step
    )  # fmt: skip
    problems: list[str] = []
    lt = float(ref.loss.detach())
    lo = float(res["loss"])
    err = abs(lo - lt)
    worst["loss"] = max(worst.get("loss", 0.0), err)
    if not np.isfinite(lo) or err > LOSS_RTOL * max(1.0, abs(lt)):
        problems.append(f"loss onnx={lo!r} torch={lt!r}")
    for e in man["outputs"][1:]:
        role, key, oname = e["role"], e["key"], e["name"]
        got = res[oname]
        if role == "param":
            want = tp[key].detach().numpy()
            base = old[key].numpy()
            delta_err = _worst(got - base, want - base)
            scale = float(np.max(np.abs(want - base), initial=0.0))
            tol = UPDATE_RTOL * scale + ABS_TOL
            label = "param"
        elif role == "state":
            kind = oname.split(":")[1]
            want = new_state[kind][tnames.index(key)].numpy()
            delta_err = _worst(got, want)
            tol = UPDATE_RTOL * float(np.max(np.abs(want), initial=0.0)) + ABS_TOL
            label = "state"
        elif role == "step":
            want = np.float32(step + 1)
            delta_err = _worst(np.asarray(got), np.asarray(want))
            tol = 0.0
            label = "state"
        elif role == "buffer":
            want = bufs[key].detach().numpy()
            delta_err = _worst(got, want)
            tol = UPDATE_RTOL * float(np.max(np.abs(want), initial=0.0)) + ABS_TOL
            label = "buffer"
        else:
            raise VerificationError(f"unknown output role {role}")
        worst[label] = max(worst.get(label, 0.0), delta_err)
        if not delta_err <= tol:
            problems.append(f"{oname}: max abs diff {delta_err:.3g} > tol {tol:.3g}")
    return problems


def verify_inference(graph: StepGraph, model: nn.Module, x0: Tensor) -> float:
    """The inference graph must match the eval-mode torch forward (two batch sizes)."""
    man = graph.manifest
    sess = _session(graph.inference_onnx)
    ref = copy.deepcopy(model).eval()
    worst = 0.0
    for run, n in enumerate(BATCHES):
        g = torch.Generator().manual_seed(99 + run)
        with torch.no_grad():
            for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
                if name not in man["baked"]:
                    t.copy_(_rand_like(t, g, name))
            x, _ = _rand_batch(x0, x0, n, g, None)
            want = ref(x).numpy()
        tensors = {**dict(ref.named_parameters()), **dict(ref.named_buffers())}
        feed = {"x": x.numpy()}
        for e in man["inference"]["inputs"][1:]:
            feed[e["name"]] = tensors[e["key"]].detach().numpy()
        got = sess.run(None, feed)[0]
        err = _worst(got, want)
        worst = max(worst, err)
        if not err <= 1e-4 * max(1.0, float(np.max(np.abs(want), initial=0.0))):
            raise VerificationError(
                f"inference graph differs from torch eval: {err:.3g} at batch {n}"
            )
    return worst
