"""NVFP4 layouts and shapes in plain Python (spec sections 1-3).

Everything here is static shape arithmetic or a pure jnp re-indexing; the
numbers mirror csrc/include/jaxfp4/format.h, which the native code uses.
"""

from __future__ import annotations

import math
from typing import Literal

import jax.numpy as jnp
import numpy as np

SfLayout = Literal["linear", "128x4", "8x4"]

BLOCK = 16            # elements per scale block (along K)
E2M1_MAX = 6.0        # largest E2M1 magnitude
E4M3_MAX = 448.0      # largest finite float8_e4m3fn
DYNAMIC_DIVISOR = 2688.0   # 6 * 448: g = amax / 2688 puts amax at the top of both codes
# float32 nearest to 1/6; the spec computes block scales with it.
RECIP6 = np.frombuffer(np.uint32(0x3E2AAAAB).tobytes(), np.float32)[0]

SF_LAYOUTS: tuple[str, ...] = ("linear", "128x4", "8x4")
# The `sf_layout` attribute of the FFI targets (csrc/README.md).
SF_LAYOUT_IDS = {"linear": 0, "128x4": 1, "8x4": 2}
# Row tile of each swizzled layout (the column tile is always 4).
_ROW_TILE = {"128x4": 128, "8x4": 8}

# E2M1 code -> value (codes 0x8..0xF are the negated magnitudes; 0x8 is -0).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)


def check_sf_layout(sf_layout: str, arg: str = "sf_layout") -> str:
    if sf_layout not in SF_LAYOUTS:
        raise ValueError(f"{arg} must be one of {SF_LAYOUTS}, got {sf_layout!r}")
    return sf_layout


def activation_sf_layout(m: int, small_batch_threshold: int) -> str:
    """The scale layout for quantized activations of M rows: "8x4" (8-row
    padding) for small batches, M <= small_batch_threshold, else "128x4"."""
    return "8x4" if m <= small_batch_threshold else "128x4"


def scale_shape(rows: int, k: int, sf_layout: str) -> tuple[int, int]:
    """[R', C'] of the scale array for `rows` rows of K elements."""
    c = k // BLOCK
    if sf_layout == "linear":
        return (rows, c)
    return (_round_up(rows, _ROW_TILE[sf_layout]), _round_up(c, 4))


def scale_offset(m: int, c: int, k: int, sf_layout: str) -> int:
    """Byte offset of logical scale (row m, block c) in a flattened scale array."""
    cols = k // BLOCK
    if sf_layout == "linear":
        return m * cols + c
    cp = _round_up(cols, 4)
    if sf_layout == "128x4":
        return (m // 128) * (cp // 4) * 512 + (c // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + c % 4
    return (m // 8) * (cp // 4) * 32 + (c // 4) * 32 + (m % 8) * 4 + c % 4


def swizzle(linear: jnp.ndarray, sf_layout: str) -> jnp.ndarray:
    """[..., R, C] linear scales -> [..., R', C'] in `sf_layout`, padding with 0x00."""
    if sf_layout == "linear":
        return linear
    *lead, r, c = linear.shape
    tile = _ROW_TILE[sf_layout]
    rp, cp = _round_up(r, tile), _round_up(c, 4)
    pad = [(0, 0)] * len(lead) + [(0, rp - r), (0, cp - c)]
    x = jnp.pad(linear, pad)  # float8 zero is the byte 0x00
    n = len(lead)
    if sf_layout == "128x4":
        # m = i*128 + j*32 + k ; c = u*4 + v  ->  [i, u, k, j, v]
        x = x.reshape(*lead, rp // 128, 4, 32, cp // 4, 4)
        x = x.transpose(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    else:
        # m = i*8 + k ; c = u*4 + v  ->  [i, u, k, v]
        x = x.reshape(*lead, rp // 8, 8, cp // 4, 4)
        x = x.transpose(*range(n), n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, rp, cp)


def unswizzle(swizzled: jnp.ndarray, rows: int, k: int, sf_layout: str) -> jnp.ndarray:
    """Inverse of `swizzle`: [..., R', C'] -> the [..., rows, K/16] linear scales."""
    c = k // BLOCK
    if sf_layout == "linear":
        return swizzled
    *lead, rp, cp = swizzled.shape
    n = len(lead)
    if sf_layout == "128x4":
        x = swizzled.reshape(*lead, rp // 128, cp // 4, 32, 4, 4)
        x = x.transpose(*range(n), n, n + 3, n + 2, n + 1, n + 4)
    else:
        x = swizzled.reshape(*lead, rp // 8, cp // 4, 8, 4)
        x = x.transpose(*range(n), n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, rp, cp)[..., :rows, :c]


def data_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Packed uint8 shape [..., M, K/2] of a logical [..., M, K] tensor."""
    return (*shape[:-1], shape[-1] // 2)


def nvfp4_bytes(n: int, k: int) -> int:
    """Bytes of an [n, k] NVFP4 weight: codes plus linear scales (0.5625 B/element)."""
    return n * k // 2 + n * k // BLOCK


def _round_up(x: int, m: int) -> int:
    return int(math.ceil(x / m) * m)
