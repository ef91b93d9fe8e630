"""edgefed: federated learning for edge devices.

Importing ``edgefed`` never imports torch: the device agent depends on this package.
Torch-side code lives in ``edgefed.train_export`` and ``edgefed.export`` only.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefed")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = ["__version__", "simulate"]


def __getattr__(name: str):  # lazy: `import edgefed` stays light and torch-free
    if name == "simulate":
        from edgefed.simulation import simulate

        return simulate
    raise AttributeError(f"module 'edgefed' has no attribute {name!r}")
