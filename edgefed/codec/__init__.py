"""Update codec: compression specs, the safe wire format, error feedback, aggregation.

See docs/wire-format.md for the normative wire format and docs/ARCHITECTURE.md for the
contract the runtime codes against. Torch-free.
"""

from edgefed.codec.accumulate import Accumulator
from edgefed.codec.errors import CodecError
from edgefed.codec.feedback import ErrorFeedback
from edgefed.codec.schema import DecodeLimits, ModelSchema, UpdateMeta
from edgefed.codec.spec import CompressionSpec, Pipeline
from edgefed.codec.tensors import (
    DenseF16,
    DenseF32,
    DenseInt4,
    DenseInt8,
    EncodedTensor,
    SparseTensor,
)
from edgefed.codec.wire import DecodedUpdate, decode_update, encode_encoded, encode_update

__all__ = [
    "Accumulator",
    "CodecError",
    "CompressionSpec",
    "DecodeLimits",
    "DecodedUpdate",
    "DenseF16",
    "DenseF32",
    "DenseInt4",
    "DenseInt8",
    "EncodedTensor",
    "ErrorFeedback",
    "ModelSchema",
    "Pipeline",
    "SparseTensor",
    "UpdateMeta",
    "decode_update",
    "encode_encoded",
    "encode_update",
]
