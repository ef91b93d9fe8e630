"""The dependency rules of the code base, declared once per package (checked by
tests/test_layering.py, which discovers every module of ``edgefed`` and ``device_agent``).

Why here and not as a list of modules in the test: a package added later (e.g.
``edgefed.protocol``) is torch-free and checked by default; only a package that needs the
coordinator extra has to be declared, and its declaration sits next to the others.

Rules:
1. Every module outside ``COORDINATOR_SIDE`` imports with ``EXTRA_DISTS`` blocked (the
   device installs none of them).
2. Edge-first direction: core <- codec <- protocol/transport <- agent/coordinator. A module
   imports (even lazily, inside a function) only modules of its own layer or lower; modules
   of ``COORDINATOR_SIDE`` count as the top layer.
3. Nothing outside ``COORDINATOR_SIDE`` imports a module inside it, not even lazily, except
   the seams in ``LAZY_SEAMS`` (imported on use, never by a device).
"""

from __future__ import annotations

# Distributions of the [coordinator] extra: a device has none of them.
EXTRA_DISTS: tuple[str, ...] = (
    "torch",
    "onnx",
    "onnxscript",
    "sklearn",
    "amqtt",
    "matplotlib",
    "torch_pruning",
    "cryptography",
    "dp_accounting",
)

# Packages (and the few modules) that may import the coordinator extra. Prefix match.
COORDINATOR_SIDE: tuple[str, ...] = (
    "edgefed.train_export",  # torch: step / inference graph export
    "edgefed.export",  # torch: distill, prune, quantize into a bundle
    "edgefed.zoo",  # torch, sklearn: demo models and data
    "edgefed.apps",  # the edgefed command, demo, plots (matplotlib)
    "edgefed.simulation",  # edgefed.simulate: builds models with torch
    "edgefed.coordinator",
    "edgefed.sharding",
    "edgefed.privacy",  # dp_accounting
    "edgefed.fleetops",  # cryptography: fleet CA and broker certificates
    "edgefed.transport.broker",  # amqtt: the embedded broker of demos and tests
    "edgefed.usermodel",  # loads a user's torch model factory (export14's branch)
    "edgefed.config.docs",  # documents every role's keys, coordinator's included (config12's)
    "edgefed.__main__",  # runs the edgefed command on import
)

# Torch-free layers, lowest first. A module belongs to the longest matching prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "core",
        (
            "edgefed._core",
            "edgefed.sparse",
            "edgefed.quant",
            "edgefed.atomic",
            "edgefed._layering",
            "edgefed.config",  # the one config reader of every role (config12's branch)
        ),
    ),
    ("codec", ("edgefed.codec",)),
    ("protocol/transport", ("edgefed.protocol", "edgefed.transport", "edgefed.security")),
    ("agent/coordinator", ("device_agent", "edgefed.bundle", "edgefed.strategies")),
)

# (importer, imported) pairs allowed across rule 3: lazy imports on a coordinator-only path.
LAZY_SEAMS: tuple[tuple[str, str], ...] = (
    ("edgefed", "edgefed.simulation"),  # `edgefed.simulate` attribute, resolved on use
    ("edgefed.strategies", "edgefed.privacy"),  # DP strategies, built only when configured
)


def _match(module: str, prefixes: tuple[str, ...]) -> str | None:
    hits = [p for p in prefixes if module == p or module.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def coordinator_side(module: str) -> bool:
    """True if ``module`` may need the coordinator extra."""
    return _match(module, COORDINATOR_SIDE) is not None


def layer(module: str) -> int | None:
    """Index in ``LAYERS`` (coordinator-side modules: the top layer); None if undeclared.

    The package root ``edgefed`` is a facade (version, lazy ``simulate``): layer 0."""
    if module == "edgefed":
        return 0
    if coordinator_side(module):
        return len(LAYERS) - 1
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for i, (_, prefixes) in enumerate(LAYERS):
        p = _match(module, prefixes)
        if p is not None and (best is None or len(p) > best[0]):
            best = (len(p), i)
    return None if best is None else best[1]
