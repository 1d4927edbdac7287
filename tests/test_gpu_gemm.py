"""The Hopper small-M GEMM (csrc/cuda/sm90/gemm_small_m.cu) and the sm90 weight
packing (jaxfp4/packing.py).

GPU tests (marked `gpu`, skipped without a CUDA device and a CUDA build) call
the FFI targets `jaxfp4_gemm_w4a16` / `jaxfp4_gemm_w4a4` directly (so every M
reaches the kernel, not only M <= 32) and through `jaxfp4.matmul`, on fresh
random operands, and compare with a float64 numpy sum of the exactly
dequantized operands (tests/oracle.py): float32 accumulation in any order and
one rounding to the output dtype. The packing tests run on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4 import format as fmt
from jaxfp4 import packing
from jaxfp4.primitives.gemm import A4_AS_A16_MIN_M, quantize_a_in_gemm

import oracle
from data import random_matrix

LAYOUTS = ("linear", "128x4", "8x4")
F8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
OUT_DTYPES = (BF16, np.float16, np.float32)


# ---- operands ------------------------------------------------------------------------

def random_scales(rng, shape) -> np.ndarray:
    """E4M3 bytes: mostly normal (2^-6 .. 240), some subnormal, a few 0 and 448; never NaN."""
    b = rng.integers(0x08, 0x78, size=shape).astype(np.uint8)
    u = rng.random(shape)
    b = np.where(u < 0.04, rng.integers(1, 8, size=shape).astype(np.uint8), b)
    b = np.where(u > 0.995, np.uint8(0), b)
    b = np.where((u > 0.99) & (u <= 0.995), np.uint8(0x7E), b)
    return b


def random_nvfp4(rng, lead, rows, k, layout, *, g_exp=(-9, -5)):
    """(codes uint8 [*lead, rows, k/2], scales uint8 in `layout`, g float32 [*lead])."""
    data = rng.integers(0, 256, size=(*lead, rows, k // 2), dtype=np.uint8)
    sf_lin = random_scales(rng, (*lead, rows, k // 16))
    scales = np.asarray(fmt.swizzle(jnp.asarray(sf_lin.view(F8)), layout)).view(np.uint8)
    g = np.exp2(rng.uniform(*g_exp, size=lead)).astype(np.float32)
    return data, scales, g


def assert_close(out, ref, absref, k: int) -> None:
    """oracle.assert_gemm_close, plus half the output type's subnormal quantum
    (a result below the smallest normal is rounded on that absolute grid)."""
    out = np.asarray(out)
    tiny = float(ml_dtypes.finfo(out.dtype).smallest_subnormal) / 2
    oracle.assert_gemm_close(out, ref, absref + tiny / (k * 2.0 ** -23), k)


def values_f64(data, scales, layout) -> np.ndarray:
    """Exact e2m1 * SF values (no global scale), float64."""
    return oracle.dequantize_f64(data, scales, None, layout, with_g=False)


@functools.cache
def _gpu():
    return next(d for d in jax.devices() if d.platform == "gpu")


def _dev(x):
    return jax.device_put(x, _gpu())


def _pack(data, scales, layout):
    pd, ps = packing.pack_weights(jnp.asarray(data), jnp.asarray(scales.view(F8)), layout)
    return np.asarray(pd), np.asarray(ps).view(np.uint8)


def ffi_w4a16(a, b_data, b_scales, b_g, n, *, layout, packed, out_dtype):
    """The FFI target on the GPU: a [*La, M, K] bf16/f16 -> [*L, M, N]."""
    lead = np.broadcast_shapes(a.shape[:-2], b_g.shape)
    m = a.shape[-2]
    if packed:
        b_data, b_scales = _pack(b_data, b_scales, layout)
    call = jax.ffi.ffi_call("jaxfp4_gemm_w4a16", jax.ShapeDtypeStruct((*lead, m, n), out_dtype))
    out = call(_dev(a), _dev(b_data), _dev(b_scales.view(F8)), _dev(b_g),
               b_sf_layout=np.int32(fmt.SF_LAYOUT_IDS[layout]), b_packing=np.int32(1 if packed else 0))
    return np.asarray(out)


def ffi_w4a4(a_data, a_scales, a_g, b_data, b_scales, b_g, n, *, a_layout, layout, packed, out_dtype):
    lead = np.broadcast_shapes(a_g.shape, b_g.shape)
    m = a_data.shape[-2]
    if packed:
        b_data, b_scales = _pack(b_data, b_scales, layout)
    call = jax.ffi.ffi_call("jaxfp4_gemm_w4a4", jax.ShapeDtypeStruct((*lead, m, n), out_dtype))
    out = call(_dev(a_data), _dev(a_scales.view(F8)), _dev(a_g), _dev(b_data), _dev(b_scales.view(F8)), _dev(b_g),
               a_sf_layout=np.int32(fmt.SF_LAYOUT_IDS[a_layout]), b_sf_layout=np.int32(fmt.SF_LAYOUT_IDS[layout]),
               b_packing=np.int32(1 if packed else 0))
    return np.asarray(out)


def check_w4a16(rng, m, n, k, *, layout="128x4", packed=True, act=BF16, out_dtype=BF16, a_lead=(), b_lead=(),
                spread=4):
    a = random_matrix(rng, (*a_lead, m, k), np.float32, spread=spread).astype(act)
    g_exp = (-8, -6) if out_dtype == np.float16 else (-9, -5)
    bd, bs, bg = random_nvfp4(rng, b_lead, n, k, layout, g_exp=g_exp)
    out = ffi_w4a16(a, bd, bs, bg, n, layout=layout, packed=packed, out_dtype=out_dtype)
    ref, absref = oracle.gemm_f64(a.astype(np.float64), values_f64(bd, bs, layout), bg)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert_close(out, ref, absref, k)
    assert "sm90_gemm_small_m_w4a16" in jaxfp4.backend_info()["kernels_run"].get("gemm", "")


def check_w4a4(rng, m, n, k, *, a_layout="8x4", layout="128x4", packed=True, out_dtype=BF16, a_lead=(),
               b_lead=()):
    ad, as_, ag = random_nvfp4(rng, a_lead, m, k, a_layout, g_exp=(-3, 0))
    bd, bs, bg = random_nvfp4(rng, b_lead, n, k, layout, g_exp=(-12, -9))
    out = ffi_w4a4(ad, as_, ag, bd, bs, bg, n, a_layout=a_layout, layout=layout, packed=packed,
                   out_dtype=out_dtype)
    g = np.asarray(ag, np.float32) * np.asarray(bg, np.float32)  # the spec's float32 product
    ref, absref = oracle.gemm_f64(values_f64(ad, as_, a_layout), values_f64(bd, bs, layout), g)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert_close(out, ref, absref, k)
    assert "sm90_gemm_small_m_w4a4" in jaxfp4.backend_info()["kernels_run"].get("gemm", "")


# ---- W4A16 ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [*range(1, 34), 64, 127, 129])
def test_w4a16_every_m(rng, m):
    """Every M in 1..33 and M > 32 (32-token tiles), N = 200 (ragged tile), K = 272 (K tail)."""
    layout = LAYOUTS[m % 3]
    out_dtype = OUT_DTYPES[(m // 3) % 3]
    check_w4a16(rng, m, 200, 272, layout=layout, packed=True, out_dtype=out_dtype)
    check_w4a16(rng, m, 200, 272, layout=layout, packed=False, out_dtype=out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [16, 48, 272, 4096])
@pytest.mark.parametrize("n", [200, 1000, 4096])
def test_w4a16_shapes(rng, n, k):
    """N not a multiple of 16/128 and large N; K = 16, 48 (< one chunk), 272, 4096."""
    for i, m in enumerate((1, 7, 16, 32)):
        layout = LAYOUTS[(i + n + k) % 3]
        check_w4a16(rng, m, n, k, layout=layout, packed=bool(i % 2))
        check_w4a16(rng, m, n, k, layout=layout, packed=not i % 2)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1088, 3072])
def test_w4a16_uneven_k_slices(rng, k):
    """K splits into warp slices of uneven or odd chunk counts (17 chunks: 8 warps of 2 and one of 1;
    48 chunks: 16 warps of 3), so the packed kernel's 2-chunk ring stages end on a half-filled one."""
    for m in (1, 6, 8, 9, 24):
        check_w4a16(rng, m, 1000, k, layout="128x4", packed=True)
        check_w4a4(rng, m, 1000, k, a_layout="8x4", layout="linear", packed=True)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("act", [BF16, np.float16], ids=["a_bf16", "a_f16"])
def test_w4a16_dtypes(rng, act, out_dtype, packed):
    """bf16 and fp16 activations, every output dtype, both weight orders, every layout."""
    for m, layout in ((3, "linear"), (12, "128x4"), (29, "8x4")):
        check_w4a16(rng, m, 1000, 272, layout=layout, packed=packed, act=act, out_dtype=out_dtype, spread=2)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_w4a16_batched(rng, packed):
    """Leading batch axes with broadcasting on either side (grid.z over the output batch)."""
    for a_lead, b_lead in (((2, 3), (2, 3)), ((2, 3), (1, 3)), ((1, 3), (2, 1)), ((3,), (1,)), ((1,), (4,))):
        check_w4a16(rng, 5, 200, 272, layout="128x4", packed=packed, a_lead=a_lead, b_lead=b_lead)
        check_w4a16(rng, 20, 48, 64, layout="linear", packed=packed, a_lead=a_lead, b_lead=b_lead,
                    out_dtype=np.float32)


# ---- W4A4 -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("a_layout", ["8x4", "128x4", "linear"])
def test_w4a4(rng, a_layout, packed):
    """Activation scales in every layout, weights plain (every layout) or packed."""
    for i, (m, n, k) in enumerate(((1, 200, 272), (5, 1000, 48), (8, 200, 16), (13, 4096, 272), (32, 1000, 4096),
                                   (33, 200, 272), (129, 64, 48))):
        check_w4a4(rng, m, n, k, a_layout=a_layout, layout=LAYOUTS[i % 3], packed=packed,
                   out_dtype=OUT_DTYPES[i % 3])


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_w4a4_batched(rng, packed):
    for a_lead, b_lead in (((2, 3), (2, 3)), ((2, 1), (1, 3)), ((3,), (1,)), ((1,), (3,))):
        check_w4a4(rng, 6, 200, 272, a_layout="8x4", layout="128x4", packed=packed, a_lead=a_lead,
                   b_lead=b_lead, out_dtype=np.float32)


# ---- W4A4 with the activations quantized in the kernel ------------------------------------

def ffi_w4a4_quantize_a(a, a_g, b_data, b_scales, b_g, n, *, layout, out_dtype):
    """jaxfp4_gemm_w4a4_quantize_a on the GPU: bf16 a [*La, M, K], packed weights."""
    lead = np.broadcast_shapes(a_g.shape, b_g.shape)
    pd, ps = _pack(b_data, b_scales, layout)
    call = jax.ffi.ffi_call("jaxfp4_gemm_w4a4_quantize_a", jax.ShapeDtypeStruct((*lead, a.shape[-2], n), out_dtype))
    return np.asarray(call(_dev(a), _dev(a_g), _dev(pd), _dev(ps.view(F8)), _dev(b_g),
                           b_sf_layout=np.int32(fmt.SF_LAYOUT_IDS[layout]), b_packing=np.int32(1)))


def check_w4a4_quantize_a(rng, m, n, k, *, layout="128x4", out_dtype=np.float32, a_lead=(), b_lead=()):
    """Bit for bit the quantize kernel then the W4A4 kernel, and close to float64."""
    a = random_matrix(rng, (*a_lead, m, k), np.float32, spread=4).astype(BF16)
    amax = np.abs(a.astype(np.float32)).reshape(*a_lead, -1).max(-1) if a_lead else np.abs(a.astype(np.float32)).max()
    g_a = (np.asarray(amax, np.float32) / 2688 * rng.uniform(0.5, 2.0, size=a_lead)).astype(np.float32)
    bd, bs, bg = random_nvfp4(rng, b_lead, n, k, layout, g_exp=(-12, -9))
    out = ffi_w4a4_quantize_a(a, g_a, bd, bs, bg, n, layout=layout, out_dtype=out_dtype)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a4_n8_packed_quantize_a"
    q = jaxfp4.quantize(_dev(a), _dev(g_a), sf_layout="8x4")
    ad, as_ = np.asarray(q.data), np.asarray(q.scales).view(np.uint8)
    two_step = ffi_w4a4(ad, as_, g_a, bd, bs, bg, n, a_layout="8x4", layout=layout, packed=True,
                        out_dtype=out_dtype)
    np.testing.assert_array_equal(out.view(np.uint8), two_step.view(np.uint8))
    g = g_a.astype(np.float32) * np.asarray(bg, np.float32)
    ref, absref = oracle.gemm_f64(values_f64(ad, as_, "8x4"), values_f64(bd, bs, layout), g)
    assert out.shape == ref.shape
    assert_close(out, ref, absref, k)


@pytest.mark.gpu
@pytest.mark.parametrize("m", range(1, 9))
def test_w4a4_quantize_a(rng, m):
    """M = 1..8, K ragged (48, 272: a short last chunk), N not a multiple of 16, a
    K that leaves the last ring item short (11008, M <= 3), every output dtype."""
    shapes = [(200, 272), (37, 48), (1000, 4096)] + ([(24, 11008)] if m <= 3 else [])
    for i, (n, k) in enumerate(shapes):
        check_w4a4_quantize_a(rng, m, n, k, layout=LAYOUTS[i % 3], out_dtype=OUT_DTYPES[(m + i) % 3])


@pytest.mark.gpu
def test_w4a4_quantize_a_nan_inf(rng):
    """NaN and Inf activations (the quantize kernel's exact path) give the same bits
    as quantize then W4A4: a NaN block has a NaN scale (its row's outputs NaN); an
    Inf block saturates (scale 448, the Inf element code 6: finite outputs)."""
    m, n, k = 6, 200, 272
    a = random_matrix(rng, (m, k), np.float32).astype(BF16)
    a[1, 5], a[3, 100], a[4, 200] = np.nan, np.inf, -np.inf
    g_a = np.float32(np.abs(a[np.isfinite(a)].astype(np.float32)).max() / 2688)
    bd, bs, bg = random_nvfp4(rng, (), n, k, "linear", g_exp=(-12, -9))
    out = ffi_w4a4_quantize_a(a, g_a, bd, bs, bg, n, layout="linear", out_dtype=np.float32)
    q = jaxfp4.quantize(_dev(a), _dev(g_a), sf_layout="8x4")
    two_step = ffi_w4a4(np.asarray(q.data), np.asarray(q.scales).view(np.uint8), g_a, bd, bs, bg, n,
                        a_layout="8x4", layout="linear", packed=True, out_dtype=np.float32)
    np.testing.assert_array_equal(out.view(np.uint32), two_step.view(np.uint32))
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2, 3, 4, 5]]).all()


@pytest.mark.gpu
def test_w4a4_quantize_a_batched_and_limits(rng):
    for a_lead, b_lead in (((3,), (1,)), ((2,), (2,))):
        check_w4a4_quantize_a(rng, 5, 200, 272, a_lead=a_lead, b_lead=b_lead)
    check_w4a4_quantize_a(rng, 2, 16, 20416)  # the largest K at M = 2 (80 KB of shared memory)
    a, g = np.ones((9, 48), BF16), np.ones((), np.float32)
    bd, bs, bg = random_nvfp4(rng, (), 40, 48, "linear")
    with pytest.raises(Exception, match="M <= 8"):
        ffi_w4a4_quantize_a(a, g, bd, bs, bg, 40, layout="linear", out_dtype=np.float32)
    with pytest.raises(Exception, match="M <= 8"):
        ffi_w4a4_quantize_a(np.ones((3, 20480), BF16), g, *random_nvfp4(rng, (), 16, 20480, "linear"), 16,
                            layout="linear", out_dtype=np.float32)


# ---- edge cases -------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
def test_nan_scale_propagates(rng, packed):
    """A NaN block scale (0x7F) makes its weight row's outputs NaN, and only those."""
    m, n, k = 9, 200, 272
    a = random_matrix(rng, (m, k), np.float32).astype(BF16)
    bd, bs, bg = random_nvfp4(rng, (), n, k, "linear")
    bs = bs.copy()
    bs[17, 3] = 0x7F
    bs[150, 16] = 0x7F
    out = ffi_w4a16(a, bd, bs, bg, n, layout="linear", packed=packed, out_dtype=np.float32)
    assert np.isnan(out[:, 17]).all() and np.isnan(out[:, 150]).all()
    keep = np.ones(n, bool)
    keep[[17, 150]] = False
    w = values_f64(bd, bs, "linear")[keep]
    ref, absref = oracle.gemm_f64(a.astype(np.float64), w, bg)
    assert_close(out[:, keep], ref, absref, k)


@pytest.mark.gpu
def test_every_output_written_after_nan_buffer(rng):
    """A large NaN-filled buffer is freed right before the call: every output element must be written."""
    for m, n, k, packed, out_dtype in ((1, 1000, 272, True, np.float32), (13, 4096, 4096, False, BF16),
                                       (33, 200, 48, True, np.float16)):
        junk = jnp.full((64 << 20,), jnp.nan, jnp.float32, device=_gpu())
        junk.block_until_ready()
        junk.delete()
        check_w4a16(rng, m, n, k, layout="128x4", packed=packed, out_dtype=out_dtype, spread=2)
        junk = jnp.full((64 << 20,), jnp.nan, jnp.float32, device=_gpu())
        junk.block_until_ready()
        junk.delete()
        check_w4a4(rng, m, n, k, a_layout="linear", layout="8x4", packed=packed, out_dtype=np.float32)
        if packed and m <= 8:
            junk = jnp.full((64 << 20,), jnp.nan, jnp.float32, device=_gpu())
            junk.block_until_ready()
            junk.delete()
            check_w4a4_quantize_a(rng, m, n, k, out_dtype=np.float32)


@pytest.mark.gpu
def test_deterministic(rng):
    """The split-K reduction has a fixed order: identical inputs give identical bits."""
    m, n, k = 8, 4096, 4096
    a = _dev(random_matrix(rng, (m, k), np.float32).astype(BF16))
    bd, bs, bg = random_nvfp4(rng, (), n, k, "128x4")
    pd, ps = _pack(bd, bs, "128x4")
    call = jax.jit(lambda *ops: jax.ffi.ffi_call("jaxfp4_gemm_w4a16", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        *ops, b_sf_layout=np.int32(1), b_packing=np.int32(1)))
    ops = (a, _dev(pd), _dev(ps.view(F8)), _dev(bg))
    first = np.asarray(call(*ops))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(call(*ops)).view(np.uint32), first.view(np.uint32))


# ---- through the public API ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_matmul_api(rng, prepared):
    """jaxfp4.quantize / prepare_weights / matmul on the GPU reach the small-M kernel."""
    n, k = 1000, 272
    w = _dev(random_matrix(rng, (n, k), np.float32))
    wq = jaxfp4.quantize(w, sf_layout="128x4")
    if prepared:
        wq = jaxfp4.prepare_weights(wq)
    plain = jaxfp4.unprepare_weights(wq) if prepared else wq
    wv = values_f64(np.asarray(plain.data), np.asarray(plain.scales).view(np.uint8), "128x4")
    g = np.asarray(plain.global_scale)
    for m in (1, 4, 17, 32):
        a = random_matrix(rng, (m, k), np.float32).astype(BF16)
        out = np.asarray(jax.jit(jaxfp4.matmul, static_argnames="out_dtype")(_dev(a), wq, out_dtype=jnp.float32))
        ref, absref = oracle.gemm_f64(a.astype(np.float64), wv, g)
        assert_close(out, ref, absref, k)
        assert jaxfp4.backend_info()["kernels_run"]["gemm"].startswith("sm90_gemm_small_m_w4a16")
        aq = jaxfp4.quantize(_dev(a.astype(np.float32)), sf_layout="8x4")
        out = np.asarray(jaxfp4.matmul(aq, wq, out_dtype=jnp.float32))
        av = values_f64(np.asarray(aq.data), np.asarray(aq.scales).view(np.uint8), "8x4")
        ref, absref = oracle.gemm_f64(av, wv, np.asarray(aq.global_scale) * g)
        assert_close(out, ref, absref, k)
        # Prepared weights from 9 rows: a decoded once and the W4A16 kernel (A4_AS_A16_MIN_M).
        kernel = "sm90_gemm_small_m_w4a16" if prepared and m >= A4_AS_A16_MIN_M else "sm90_gemm_small_m_w4a4"
        assert jaxfp4.backend_info()["kernels_run"]["gemm"].startswith(kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(9, 1000, 272), (16, 200, 4096), (17, 37, 48), (24, 4096, 272),
                                   (32, 1000, 4096)])
def test_w4a4_as_w4a16_matches_the_w4a4_kernel(rng, m, n, k):
    """W4A4 from A4_AS_A16_MIN_M rows with prepared weights: the activations decoded
    to bf16 once and the W4A16 kernel, bit for bit the W4A4 kernel's result (the same
    exact products, summed in the same order, scaled by the same float32 g_a * g_b)."""
    a_layout = ("8x4", "128x4", "linear")[m % 3]
    ad, as_, ag = random_nvfp4(rng, (), m, k, a_layout, g_exp=(-3, 0))
    bd, bs, bg = random_nvfp4(rng, (), n, k, "128x4", g_exp=(-12, -9))
    aq = jaxfp4.NVFP4Tensor(_dev(ad), _dev(as_.view(F8)), _dev(ag), a_layout)
    wq = jaxfp4.prepare_weights(jaxfp4.NVFP4Tensor(_dev(bd), _dev(bs.view(F8)), _dev(bg), "128x4"))
    for out_dtype in (jnp.bfloat16, jnp.float32):
        got = np.asarray(jax.jit(jaxfp4.matmul, static_argnames="out_dtype")(aq, wq, out_dtype=out_dtype))
        assert jaxfp4.backend_info()["kernels_run"]["gemm"].startswith("sm90_gemm_small_m_w4a16")
        want = ffi_w4a4(ad, as_, ag, bd, bs, bg, n, a_layout=a_layout, layout="128x4", packed=True,
                        out_dtype=np.dtype(out_dtype))
        assert jaxfp4.backend_info()["kernels_run"]["gemm"].startswith("sm90_gemm_small_m_w4a4")
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    ref, absref = oracle.gemm_f64(values_f64(ad, as_, a_layout), values_f64(bd, bs, "128x4"),
                                  np.float32(ag) * np.float32(bg))
    assert_close(got, ref, absref, k)


@pytest.mark.gpu
def test_matmul_input_scale(rng):
    """matmul(a, w, input_scale=g) == matmul(quantize(a, g), w) on the GPU: the
    in-kernel quantization for bf16 a, prepared weights and small M x K,
    quantize_decoded + the W4A16 kernel for the rest of M <= 32, the quantize
    kernel then XLA's GEMM beyond."""
    for n, k, ms in ((1000, 272, (1, 7, 8, 9, 33)), (40, 4096, (1, 2, 3)), (40, 14336, (1, 2))):
        plain = jaxfp4.quantize(_dev(random_matrix(rng, (n, k), np.float32)))
        wq = jaxfp4.prepare_weights(plain)
        for m in ms:
            a = _dev(random_matrix(rng, (m, k), np.float32).astype(BF16))
            g = jnp.float32(np.abs(np.asarray(a, np.float32)).max() / 2688)
            got = jax.jit(lambda a, w, g: jaxfp4.matmul(a, w, input_scale=g, out_dtype=jnp.float32))(a, wq, g)
            fused = quantize_a_in_gemm(m, k, jnp.bfloat16, "sm90")
            assert fused == (m <= 8 and m * k <= 8192)
            kernel = jaxfp4.backend_info()["kernels_run"]["gemm"]
            assert kernel.endswith("_quantize_a") == fused, (m, k, kernel)
            if not fused and m <= 32:  # quantize_decoded + the W4A16 kernel in one call
                assert kernel.startswith("sm90_gemm_small_m_w4a16"), (m, k, kernel)
                assert jaxfp4.backend_info()["lowered"]["gemm[cuda]"].startswith("w4a4_decoded")
            layout = "8x4" if m <= 32 else "128x4"
            aq = jaxfp4.quantize(a, g, sf_layout=layout)
            if m <= 32:  # both sides run this library's kernels: bit for bit
                want = jaxfp4.matmul(aq, wq, out_dtype=jnp.float32)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            else:  # XLA's GEMM, whose algorithm (summation order) may differ between two compilations
                av = values_f64(np.asarray(aq.data), np.asarray(aq.scales).view(np.uint8), layout)
                wv = values_f64(np.asarray(plain.data), np.asarray(plain.scales).view(np.uint8), "128x4")
                ref, absref = oracle.gemm_f64(av, wv, np.asarray(aq.global_scale) * np.asarray(plain.global_scale))
                assert_close(np.asarray(got), ref, absref, k)


# ---- packing (CPU) --------------------------------------------------------------------------

_SIGN_BIT = (13, 12, 15, 14)


def _spec_pack(data, sf_lin, n, k):
    """The packed layout of jaxfp4/packing.py's docstring, written as plain loops."""
    (t, dc), (_, kp) = packing.packed_shapes(n, k)
    codes = np.zeros((t * 16, kp), np.uint8)
    codes[:n, :k] = np.stack([data & 15, data >> 4], -1).reshape(n, k)
    sfl = np.zeros((t * 16, kp // 16), np.uint8)
    sfl[:n, :k // 16] = sf_lin
    out = np.zeros((t, dc), np.uint8)
    outs = np.zeros((t, kp), np.uint8)
    for tile in range(t):
        for c in range(kp // 64):
            for lane in range(32):
                g, tt = divmod(lane, 4)
                for r in range(2):
                    outs[tile, c * 64 + 2 * lane + r] = sfl[16 * tile + 8 * r + g, 4 * c + tt]
                    for h in range(2):
                        w = 0
                        for i in range(8):
                            p, f = divmod(i, 2)
                            q = int(codes[16 * tile + 8 * r + g, 64 * c + 16 * tt + 8 * h + i])
                            w |= (q & 7) << (16 * f + 3 * p)
                            w |= (q >> 3) << (16 * f + _SIGN_BIT[p])
                        base = c * 512 + lane * 16 + (2 * r + h) * 4
                        out[tile, base:base + 4] = np.frombuffer(np.uint32(w).tobytes(), np.uint8)
    return out, outs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n,k", [(1, 16), (16, 64), (20, 48), (33, 272), (130, 128)])
def test_packing_matches_spec(rng, n, k, layout):
    data = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    sf_lin = rng.integers(0, 256, (n, k // 16), dtype=np.uint8)
    scales = fmt.swizzle(jnp.asarray(sf_lin.view(F8)), layout)
    pd, ps = packing.pack_weights(jnp.asarray(data), scales, layout)
    assert pd.dtype == jnp.uint8 and ps.dtype == jnp.float8_e4m3fn
    (dr, dc), (sr, sc) = packing.packed_shapes(n, k)
    assert pd.shape == (dr, dc) and ps.shape == (sr, sc)
    want_d, want_s = _spec_pack(data, sf_lin, n, k)
    np.testing.assert_array_equal(np.asarray(pd), want_d)
    np.testing.assert_array_equal(np.asarray(ps).view(np.uint8), want_s)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("lead", [(), (3,), (2, 1)])
@pytest.mark.parametrize("n,k", [(1, 16), (200, 272), (37, 48), (64, 1024)])
def test_packing_round_trip(rng, n, k, lead, layout):
    """unpack(pack(x)) == x bit for bit (swizzled padding is 0x00 by the spec), batch axes too, under jit."""
    data = rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8)
    sf_lin = rng.integers(0, 256, (*lead, n, k // 16), dtype=np.uint8)
    scales = fmt.swizzle(jnp.asarray(sf_lin.view(F8)), layout)
    pd, ps = jax.jit(packing.pack_weights, static_argnums=2)(jnp.asarray(data), scales, layout)
    assert pd.shape[:len(lead)] == lead and ps.shape[:len(lead)] == lead
    ud, us = jax.jit(packing.unpack_weights, static_argnums=(2, 3, 4))(pd, ps, n, k, layout)
    np.testing.assert_array_equal(np.asarray(ud), data)
    np.testing.assert_array_equal(np.asarray(us).view(np.uint8), np.asarray(scales).view(np.uint8))
    if lead:  # batch entries pack independently
        first = (0,) * len(lead)
        pd0, ps0 = packing.pack_weights(jnp.asarray(data[first]), scales[first], layout)
        np.testing.assert_array_equal(np.asarray(pd[first]), np.asarray(pd0))
        np.testing.assert_array_equal(np.asarray(ps[first]).view(np.uint8), np.asarray(ps0).view(np.uint8))


def test_packing_shapes_and_errors():
    assert packing.PACKING_SM90 == 1
    assert packing.packed_shapes(28672, 4096) == ((1792, 32768), (1792, 4096))
    assert packing.packed_shapes(200, 272) == ((13, 8 * 320), (13, 320))
    assert packing.packed_shapes(1, 16) == ((1, 512), (1, 64))
    with pytest.raises(ValueError):
        packing.packed_shapes(16, 24)
    with pytest.raises(ValueError):
        packing.unpack_weights(jnp.zeros((2, 512), jnp.uint8), jnp.zeros((2, 64), jnp.float8_e4m3fn), 16, 64,
                               "linear")
