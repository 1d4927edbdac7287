"""The pure-JAX implementation of the NVFP4 spec: the test oracle and the
fallback lowering on any platform without a native handler.

Readable jnp only, every step in the spec's order (nvfp4-spec.md sections 2-4).
Functions take and return plain arrays so that they can be lowered in place of
an FFI call; `jaxfp4.ops` wraps them in NVFP4Tensor for users.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxfp4 import format as fmt

_F32 = jnp.float32


# ---- element coding ----------------------------------------------------------

def e2m1_encode(v: jax.Array) -> jax.Array:
    """float32 -> E2M1 code (uint8 in 0..15): RNE on |v|, saturate at 6, keep the sign."""
    a = jnp.abs(v)
    # Each comparison is the midpoint between neighbouring magnitudes; `>=`
    # where the tie goes up (to the even code), `>` where it stays down.
    code = sum(
        (cmp(a, t)).astype(jnp.uint8)
        for cmp, t in ((jnp.greater, 0.25), (jnp.greater_equal, 0.75), (jnp.greater, 1.25),
                       (jnp.greater_equal, 1.75), (jnp.greater, 2.5), (jnp.greater_equal, 3.5),
                       (jnp.greater, 5.0))
    )
    sign = jnp.signbit(v).astype(jnp.uint8) << 3
    return jnp.where(jnp.isnan(v), jnp.uint8(7), code | sign)


def e2m1_decode(codes: jax.Array) -> jax.Array:
    """E2M1 code (uint8 in 0..15) -> float32 value: sign, 2 exponent bits, 1 mantissa bit.

    Arithmetic rather than a table lookup: XLA fuses it into its consumers,
    where a 16-entry gather would not fuse on GPUs."""
    c = codes.astype(jnp.int32)
    e, m = (c >> 1) & 3, (c & 1).astype(_F32)
    mag = jnp.where(e == 0, 0.5 * m, jnp.ldexp(1.0 + 0.5 * m, e - 1))  # subnormal: 0 or 0.5
    return jnp.where((c & 8) != 0, -mag, mag)


def e4m3_satfinite(v: jax.Array) -> jax.Array:
    """float32 -> float8_e4m3fn, RNE with saturation at 448; NaN -> 0x7F."""
    sf = jnp.minimum(v, fmt.E4M3_MAX).astype(jnp.float8_e4m3fn)
    nan = lax.bitcast_convert_type(jnp.uint8(0x7F), jnp.float8_e4m3fn)
    return jnp.where(jnp.isnan(v), nan, sf)


def pack_codes(codes: jax.Array) -> jax.Array:
    """[..., K] codes -> [..., K/2] bytes: element 2j low nibble, 2j+1 high nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(data: jax.Array) -> jax.Array:
    """[..., K/2] bytes -> [..., K] codes (inverse of pack_codes)."""
    lo, hi = data & 0xF, data >> 4
    return jnp.stack([lo, hi], axis=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


# ---- quantize / dequantize ---------------------------------------------------

def dynamic_global_scale(x: jax.Array) -> jax.Array:
    """g = (largest finite |x| over the last two axes) / 2688, or 1 when that is 0."""
    x = x.astype(_F32)
    amax = jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0), axis=(-2, -1))
    # XLA rewrites division by a constant as multiplication by its (rounded)
    # reciprocal, which is not the spec's float32 division. A divisor XLA
    # cannot prove constant (amax is never negative) keeps a true division.
    divisor = jnp.where(amax < 0, jnp.float32(1.0), jnp.float32(fmt.DYNAMIC_DIVISOR))
    return jnp.where(amax == 0, jnp.float32(1.0), amax / divisor)


def quantize(x: jax.Array, global_scale: jax.Array | None = None, *, sf_layout: str = "128x4"):
    """x [..., M, K] -> (data uint8 [..., M, K/2], scales float8_e4m3fn, g float32 [...]).

    `global_scale` is the decode scale g, broadcastable to x.shape[:-2]; None
    computes it per leading batch entry from the finite amax.
    """
    x = x.astype(_F32)
    *lead, m, k = x.shape
    g = dynamic_global_scale(x) if global_scale is None else global_scale
    g = jnp.broadcast_to(jnp.asarray(g, _F32), tuple(lead))
    gs = (jnp.float32(1.0) / g)[..., None, None]

    blocks = x.reshape(*lead, m, k // fmt.BLOCK, fmt.BLOCK)
    # XLA's vectorized CPU max drops NaN on large reductions: restore it.
    vmax = jnp.max(jnp.abs(blocks), axis=-1)
    vmax = jnp.where(jnp.any(jnp.isnan(blocks), axis=-1), jnp.float32(jnp.nan), vmax)
    # The barrier keeps XLA from reassociating gs * (vmax * R6) into
    # vmax * (gs * R6), which rounds differently.
    sf = e4m3_satfinite(gs * lax.optimization_barrier(vmax * fmt.RECIP6))
    sf_f = sf.astype(_F32)
    # 1 / gs is not g in float32; the barrier stops XLA from simplifying it so.
    inv_gs = jnp.float32(1.0) / lax.optimization_barrier(gs)
    out_scale = jnp.where(sf_f == 0, jnp.float32(0.0), jnp.float32(1.0) / (sf_f * inv_gs))
    codes = e2m1_encode(blocks * out_scale[..., None]).reshape(*lead, m, k)
    return pack_codes(codes), fmt.swizzle(sf, sf_layout), g


def dequantize_unscaled(data: jax.Array, scales: jax.Array, sf_layout: str) -> jax.Array:
    """e2m1(q) * SF in float32 (exact), without the global scale: [..., M, K]."""
    *lead, m, half_k = data.shape
    k = 2 * half_k
    values = e2m1_decode(unpack_codes(data)).reshape(*lead, m, k // fmt.BLOCK, fmt.BLOCK)
    sf = fmt.unswizzle(scales, m, k, sf_layout).astype(_F32)
    return (values * sf[..., None]).reshape(*lead, m, k)


def dequantize(data, scales, global_scale, *, sf_layout: str, dtype=jnp.float32) -> jax.Array:
    """x_hat = e2m1(q) * SF * g in float32, then cast to `dtype`."""
    x = dequantize_unscaled(data, scales, sf_layout)
    return (x * jnp.asarray(global_scale, _F32)[..., None, None]).astype(dtype)


# ---- GEMM ------------------------------------------------------------------------

def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """[..., M, K] x [..., N, K] -> [..., M, N], float32 accumulation, batch axes broadcast."""
    return jnp.matmul(a, jnp.swapaxes(b, -1, -2), precision=lax.Precision.HIGHEST,
                      preferred_element_type=_F32)


def gemm_w4a4(a_data, a_scales, a_g, b_data, b_scales, b_g, *, a_sf_layout: str,
              b_sf_layout: str, out_dtype=jnp.bfloat16) -> jax.Array:
    """C = (g_a * g_b) * sum_k (e2m1(qa)*SFa) * (e2m1(qb)*SFb)."""
    acc = _dot_nt(dequantize_unscaled(a_data, a_scales, a_sf_layout),
                  dequantize_unscaled(b_data, b_scales, b_sf_layout))
    g = jnp.asarray(a_g, _F32) * jnp.asarray(b_g, _F32)
    return (g[..., None, None] * acc).astype(out_dtype)


def gemm_w4a16(a, b_data, b_scales, b_g, *, b_sf_layout: str, out_dtype=jnp.bfloat16) -> jax.Array:
    """C = g_b * sum_k a * (e2m1(qb)*SFb)."""
    acc = _dot_nt(a.astype(_F32), dequantize_unscaled(b_data, b_scales, b_sf_layout))
    return (jnp.asarray(b_g, _F32)[..., None, None] * acc).astype(out_dtype)
