"""jaxfp4: NVFP4 (E2M1 values, E4M3 scales per 16, a float32 global scale) for JAX."""

from jaxfp4._ffi import backend_info
from jaxfp4.ops import (
    dequantize,
    from_float4,
    matmul,
    prepare_weights,
    quantize,
    to_scaled_matmul_operands,
    unprepare_weights,
)
from jaxfp4.tensor import NVFP4Tensor

__version__ = "0.1.0"

__all__ = [
    "NVFP4Tensor",
    "backend_info",
    "dequantize",
    "from_float4",
    "matmul",
    "prepare_weights",
    "quantize",
    "to_scaled_matmul_operands",
    "unprepare_weights",
]
