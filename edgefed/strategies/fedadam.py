"""FedAdam: Adam as the server optimizer (see :mod:`edgefed.strategies.fedopt`)."""

from edgefed.strategies.fedopt import FedAdam

__all__ = ["FedAdam"]
