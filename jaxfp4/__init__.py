"""jaxfp4: NVFP4 (E2M1 values, E4M3 scales per 16, a float32 global scale) for JAX.

`jaxfp4.flax` (needs flax) and `jaxfp4.checkpoint` (needs safetensors) are
imported on first access, so those stay optional dependencies.
"""

import importlib

from jaxfp4._ffi import backend_info
from jaxfp4.chain import Link, matmul_chain
from jaxfp4.dot_general import dot_general
from jaxfp4.fused import InterleavedSwiGLU, RMSNorm, RotaryKVCache, SwiGLU, rope_tables
from jaxfp4.ops import (
    dequantize,
    from_float4,
    interleave_gate_up,
    interleave_rotary,
    matmul,
    prepare_weights,
    quantize,
    to_scaled_matmul_operands,
    unprepare_weights,
)
from jaxfp4.tensor import NVFP4Tensor

__version__ = "0.1.0"

__all__ = [
    "InterleavedSwiGLU",
    "Link",
    "NVFP4Tensor",
    "RMSNorm",
    "RotaryKVCache",
    "SwiGLU",
    "backend_info",
    "dequantize",
    "dot_general",
    "from_float4",
    "interleave_gate_up",
    "interleave_rotary",
    "matmul",
    "matmul_chain",
    "prepare_weights",
    "quantize",
    "rope_tables",
    "to_scaled_matmul_operands",
    "unprepare_weights",
]

# Submodules with optional dependencies, imported on first attribute access.
# They are not in __all__: `from jaxfp4 import *` must not need flax or safetensors.
_LAZY_SUBMODULES = ("flax", "checkpoint")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"jaxfp4.{name}")
    raise AttributeError(f"module 'jaxfp4' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY_SUBMODULES])
