"""edgefed device agent: runs on the device without PyTorch (onnxruntime, numpy, paho-mqtt)."""

__all__: list[str] = []
