"""Client-level differential privacy (DP-FedAvg): clip each update, add Gaussian noise to the sum.

``edgefed.privacy.dp_fedavg`` is numpy only; ``edgefed.privacy.accountant`` needs the
coordinator extra (``dp-accounting``) and is imported on use.
"""

from edgefed.privacy.dp_fedavg import DPConfig, DPError, DPFedAvgAggregator

__all__ = ["DPConfig", "DPError", "DPFedAvgAggregator"]
