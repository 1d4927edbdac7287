"""An independent numpy implementation of nvfp4-spec.md, written separately
from jaxfp4.reference so that the two check each other: float32 numpy
arithmetic for quantization, ml_dtypes for E4M3 rounding, float64 for GEMMs."""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float64)
# Midpoints between neighbouring E2M1 magnitudes and which way a tie goes.
_MIDS = [(0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)]


def e2m1_code(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    code = np.zeros(v.shape, np.uint8)
    for mid, tie_up in _MIDS:
        code += (a >= mid) if tie_up else (a > mid)
    code |= np.signbit(v).astype(np.uint8) << 3
    return np.where(np.isnan(v), np.uint8(7), code)


def e4m3_byte(v: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        b = np.minimum(v, F32(448)).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return np.where(np.isnan(v), np.uint8(0x7F), b)


def offset(m, c, C, layout):
    if layout == "linear":
        return m * C + c
    cp = -(-C // 4) * 4
    if layout == "128x4":
        return (m // 128) * (cp // 4) * 512 + (c // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + c % 4
    return (m // 8) * (cp // 4) * 32 + (c // 4) * 32 + (m % 8) * 4 + c % 4


def padded(R, C, layout):
    if layout == "linear":
        return R, C
    t = 128 if layout == "128x4" else 8
    return -(-R // t) * t, -(-C // 4) * 4


def quantize_2d(x: np.ndarray, g: float, layout: str):
    """One [M, K] matrix -> (data uint8 [M, K/2], scales uint8 [R', C'])."""
    x = np.asarray(x, F32)
    M, K = x.shape
    C = K // 16
    gs = F32(1) / F32(g)
    blocks = x.reshape(M, C, 16)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        vmax = np.max(np.abs(blocks), axis=-1)  # np.max propagates NaN
        sf = e4m3_byte(gs * (vmax * F32(1 / 6)))
        sf_f = sf.view(ml_dtypes.float8_e4m3fn).astype(F32)
        os_ = np.where(sf_f == 0, F32(0), F32(1) / (sf_f * (F32(1) / gs))).astype(F32)
        codes = e2m1_code((blocks * os_[..., None]).astype(F32)).reshape(M, K)
    data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    rp, cp = padded(M, C, layout)
    scales = np.zeros(rp * cp, np.uint8)
    mm, cc = np.meshgrid(np.arange(M), np.arange(C), indexing="ij")
    scales[offset(mm, cc, C, layout)] = sf
    return data, scales.reshape(rp, cp)


def dynamic_g(x: np.ndarray) -> np.float32:
    x = np.asarray(x, F32)
    fin = np.abs(x[np.isfinite(x)])
    amax = fin.max() if fin.size else F32(0)
    return F32(1) if amax == 0 else F32(amax) / F32(2688)


def quantize(x: np.ndarray, g=None, layout: str = "128x4"):
    """[..., M, K] -> (data, scales uint8, g float32 [...]) per leading entry."""
    x = np.asarray(x, F32)
    lead = x.shape[:-2]
    xs = x.reshape(-1, *x.shape[-2:])
    gs = [dynamic_g(e) for e in xs] if g is None else np.broadcast_to(np.asarray(g, F32), lead).reshape(-1)
    outs = [quantize_2d(e, gg, layout) for e, gg in zip(xs, gs)]
    data = np.stack([o[0] for o in outs]).reshape(*lead, *outs[0][0].shape)
    scales = np.stack([o[1] for o in outs]).reshape(*lead, *outs[0][1].shape)
    return data, scales, np.asarray(gs, F32).reshape(lead)


def dequantize_f64(data, scales, g, layout, *, with_g=True) -> np.ndarray:
    """Exact float64 values [..., M, K] of an NVFP4 tensor given as numpy arrays."""
    data = np.asarray(data)
    scales = np.asarray(scales).view(np.uint8) if np.asarray(scales).dtype != np.uint8 else np.asarray(scales)
    *lead, M, hk = data.shape
    K, C = 2 * hk, hk // 8
    codes = np.stack([data & 15, data >> 4], -1).reshape(*lead, M, K)
    vals = E2M1[codes]
    flat = scales.reshape(*lead, -1)
    mm, cc = np.meshgrid(np.arange(M), np.arange(C), indexing="ij")
    sf = flat[..., offset(mm, cc, C, layout)].view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    out = vals * np.repeat(sf, 16, axis=-1)
    if with_g:
        out = out * np.asarray(g, np.float64)[..., None, None]
    return out


def _u8(x):
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype != np.uint8 else x


def gemm_f64(a_vals: np.ndarray, b_vals: np.ndarray, g: np.ndarray):
    """(C, |A|@|B|^T) in float64 from exact operand values, g broadcast over [..]."""
    g = np.asarray(g, np.float64)[..., None, None]
    bt = np.swapaxes(b_vals, -1, -2)
    return g * (a_vals @ bt), np.abs(g) * (np.abs(a_vals) @ np.abs(bt))


_EPS = {np.dtype(np.float32): 2.0 ** -24, np.dtype(ml_dtypes.bfloat16): 2.0 ** -8,
        np.dtype(np.float16): 2.0 ** -11}


def assert_gemm_close(out, ref, absref, k: int) -> None:
    """float32 accumulation (any order) then one rounding to out's dtype."""
    out = np.asarray(out)
    eps = _EPS[out.dtype]
    o = out.astype(np.float64)
    tol = absref * k * 2.0 ** -23 + np.abs(ref) * eps + 1e-30
    assert not np.isnan(o).any(), "NaN in output"
    # Past max + half an ulp the rounding gives +-inf (near it, either may come).
    fi = ml_dtypes.finfo(out.dtype)
    edge = float(fi.max) + 2.0 ** (fi.maxexp - 1 - fi.nmant) / 2
    must_inf = np.abs(ref) - tol > edge
    may_inf = (np.abs(ref) + tol >= edge) & (o == np.copysign(np.inf, ref))
    assert (o[must_inf] == np.copysign(np.inf, ref[must_inf])).all(), "overflow must round to inf"
    keep = ~(must_inf | may_inf)
    o, ref, tol = o[keep], ref[keep], tol[keep]
    bad = np.abs(o - ref) > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outside tolerance; worst excess {np.max(np.abs(o - ref) - tol)}: "
        f"got {o[bad][:4]}, want {ref[bad][:4]}")


def u8(x):
    return _u8(x)
