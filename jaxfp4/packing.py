"""Pre-packed weight order for the Hopper small-M GEMM (`b_packing = 1`, "sm90").

`pack_weights` re-orders the bits of NVFP4 weights [..., N, K] (codes
[..., N, K/2], scales in any layout) into the order the kernel of
csrc/cuda/sm90/gemm_small_m.cu loads fastest; `unpack_weights` is its exact
inverse. Both are pure jnp (no native code, any platform), and leading batch
axes pass through. The global scale is not touched.

Packed layout (part of the on-disk format: arrays saved after
`jaxfp4.prepare_weights` are in this order)
---------------------------------------------------------------------------
Let T = ceil(N/16) row tiles, Q = ceil(K/64) chunks, Kp = 64*Q. Rows n >= N
and columns k >= K are padding: code 0 and scale 0x00.

packed_data: uint8 [..., T, 8*Kp]. Row `tile` holds Q chunk records of 512
bytes (chunk c covers k in [64c, 64c+64)). A chunk record is 32 lane records
of 16 bytes, lane l = 4*g + t (g in 0..7, t in 0..3). A lane record is four
little-endian uint32 words W[2*r + h] (r, h in {0, 1}); word W[2*r + h] holds
the 8 codes of row n = 16*tile + 8*r + g at k = 64*c + 16*t + 8*h + i,
i = 0..7. Writing i = 2*p + f (pair p in 0..3, f in {0, 1}) and the E2M1 code
as sign s (bit 3) and magnitude mag (bits 2..0):

    bits [16*f + 3*p, 16*f + 3*p + 2]  = mag
    bit   16*f + (13, 12, 15, 14)[p]   = s

so each 16-bit half holds one element of each pair: the bf16 bits of a pair
(sign at bit 15, magnitude at bits 8..6 of each half; the value times 2^-126)
come out with one or two shifts and a mask, and a lane's 16-byte load is
exactly its mma.m16n8k16 A fragments (rows g and g+8) for 4 k16 steps.

packed_scales: float8_e4m3fn [..., T, Kp]. Row `tile` holds Q chunk records
of 64 bytes; byte 2*l + r of chunk c (l = 4*g + t) is the scale of row
n = 16*tile + 8*r + g, block 4*c + t (the block of the lane's 16 codes).

The original `sf_layout` is not needed to read packed scales; `unpack_weights`
takes it to rebuild the scales in that layout (swizzled padding comes back as
0x00, which the spec makes it anyway).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4 import format as fmt

PACKING_SM90 = 1  # the FFI `b_packing` attribute of this order

_TILE = 16     # weight rows per tile
_CHUNK = 64    # K elements per chunk
# Bit of the sign of pair p inside each 16-bit half (magnitude at 3p..3p+2).
_SIGN_BIT = (13, 12, 15, 14)


def packed_shapes(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((rows, cols) of packed_data, (rows, cols) of packed_scales) for [n, k] weights."""
    if k % fmt.BLOCK:
        raise ValueError(f"K must be a multiple of {fmt.BLOCK}, got {k}")
    t = -(-n // _TILE)
    kp = -(-k // _CHUNK) * _CHUNK
    return (t, 8 * kp), (t, kp)


def _u8(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x if x.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(x, jnp.uint8)


def _pad_rows_cols(x: jax.Array, rows: int, cols: int) -> jax.Array:
    *lead, r, c = x.shape
    return jnp.pad(x, [(0, 0)] * len(lead) + [(0, rows - r), (0, cols - c)])


def pack_weights(data: jax.Array, scales: jax.Array, sf_layout: str) -> tuple[jax.Array, jax.Array]:
    """(codes uint8 [..., N, K/2], scales [..., R', C'] in sf_layout) -> (packed_data, packed_scales)."""
    fmt.check_sf_layout(sf_layout)
    data = jnp.asarray(data)
    if data.dtype != jnp.uint8 or data.ndim < 2:
        raise ValueError(f"data must be uint8 [..., N, K/2], got {data.dtype}{list(data.shape)}")
    *lead, n, hk = data.shape
    k = 2 * hk
    (t, _), (_, kp) = packed_shapes(n, k)
    q = kp // _CHUNK
    nl = len(lead)

    codes = jnp.stack([data & 0xF, data >> 4], axis=-1).reshape(*lead, n, k)
    codes = _pad_rows_cols(codes, t * _TILE, kp).astype(jnp.uint32)
    # [..., tile, r, g, c, t, h, p, f]
    codes = codes.reshape(*lead, t, 2, 8, q, 4, 2, 4, 2)
    mag, sign = codes & 7, codes >> 3
    p = np.arange(4, dtype=np.uint32)[:, None]
    f = np.arange(2, dtype=np.uint32)[None, :]
    mag_shift = jnp.asarray(16 * f + 3 * p)                                   # [p, f]
    sign_shift = jnp.asarray(16 * f + np.asarray(_SIGN_BIT, np.uint32)[:, None])
    bits = (mag << mag_shift) | (sign << sign_shift)
    # the fields are disjoint, so a sum over (p, f) is their OR
    words = jnp.sum(bits, axis=(-2, -1), dtype=jnp.uint32)                   # [..., tile, r, g, c, t, h]
    # -> [..., tile, c, g, t, r, h]
    words = words.transpose(*range(nl), nl, nl + 3, nl + 2, nl + 4, nl + 1, nl + 5)
    byts = (words[..., None] >> jnp.asarray(np.arange(4, dtype=np.uint32) * 8)) & 0xFF
    packed_data = byts.astype(jnp.uint8).reshape(*lead, t, 8 * kp)

    sf = _u8(fmt.unswizzle(jnp.asarray(scales), n, k, sf_layout))          # [..., N, C]
    sf = _pad_rows_cols(sf, t * _TILE, kp // fmt.BLOCK)
    sf = sf.reshape(*lead, t, 2, 8, q, 4)                                     # [..., tile, r, g, c, t]
    sf = sf.transpose(*range(nl), nl, nl + 3, nl + 2, nl + 4, nl + 1)        # [..., tile, c, g, t, r]
    packed_scales = jax.lax.bitcast_convert_type(sf.reshape(*lead, t, kp), jnp.float8_e4m3fn)
    return packed_data, packed_scales


def unpack_weights(packed_data: jax.Array, packed_scales: jax.Array, n: int, k: int,
                   sf_layout: str) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pack_weights`: -> (codes uint8 [..., n, k/2], scales [..., R', C'] in sf_layout)."""
    fmt.check_sf_layout(sf_layout)
    (t, dcols), (_, kp) = packed_shapes(n, k)
    packed_data = jnp.asarray(packed_data)
    if packed_data.dtype != jnp.uint8 or tuple(packed_data.shape[-2:]) != (t, dcols):
        raise ValueError(f"packed_data must be uint8 [..., {t}, {dcols}] for (n, k) = ({n}, {k}), "
                         f"got {packed_data.dtype}{list(packed_data.shape)}")
    if tuple(packed_scales.shape[-2:]) != (t, kp):
        raise ValueError(f"packed_scales must be [..., {t}, {kp}] for (n, k) = ({n}, {k}), "
                         f"got {list(packed_scales.shape)}")
    *lead, _, _ = packed_data.shape
    nl = len(lead)
    q = kp // _CHUNK

    byts = packed_data.reshape(*lead, t, q, 8, 4, 2, 2, 4).astype(jnp.uint32)  # [.., tile, c, g, t, r, h, byte]
    words = jnp.sum(byts << jnp.asarray(np.arange(4, dtype=np.uint32) * 8), axis=-1, dtype=jnp.uint32)
    # -> [..., tile, r, g, c, t, h]
    words = words.transpose(*range(nl), nl, nl + 4, nl + 2, nl + 1, nl + 3, nl + 5)
    p = np.arange(4, dtype=np.uint32)[:, None]
    f = np.arange(2, dtype=np.uint32)[None, :]
    mag_shift = jnp.asarray(16 * f + 3 * p)
    sign_shift = jnp.asarray(16 * f + np.asarray(_SIGN_BIT, np.uint32)[:, None])
    w = words[..., None, None]
    codes = ((w >> mag_shift) & 7) | (((w >> sign_shift) & 1) << 3)          # [..., tile, r, g, c, t, h, p, f]
    codes = codes.reshape(*lead, t * _TILE, kp)[..., :n, :k].astype(jnp.uint8)
    data = codes[..., 0::2] | (codes[..., 1::2] << 4)

    sf = _u8(packed_scales).reshape(*lead, t, q, 8, 4, 2)                     # [..., tile, c, g, t, r]
    sf = sf.transpose(*range(nl), nl, nl + 4, nl + 2, nl + 1, nl + 3)        # [..., tile, r, g, c, t]
    sf = sf.reshape(*lead, t * _TILE, kp // fmt.BLOCK)[..., :n, :k // fmt.BLOCK]
    scales = fmt.swizzle(jax.lax.bitcast_convert_type(sf, jnp.float8_e4m3fn), sf_layout)
    return data, scales
