"""edgefed: federated learning for edge devices.

Importing ``edgefed`` never imports torch: the device agent depends on this package.
Torch-side code lives in ``edgefed.train_export`` and ``edgefed.export`` only.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefed")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = ["__version__"]
