"""The public ops on the CPU (native FFI handlers) against the oracle."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4 import format as fmt

import oracle
from data import edge_blocks, random_matrix

MS = [1, 7, 8, 9, 127, 129, 300]
KS = [16, 48, 272]


def _u8(x):
    return np.asarray(x).view(np.uint8)


def _assert_matches_oracle(t, x, g, layout):
    want = oracle.quantize(np.asarray(x, np.float32), g, layout)
    np.testing.assert_array_equal(np.asarray(t.data), want[0])
    np.testing.assert_array_equal(_u8(t.scales), want[1])
    np.testing.assert_array_equal(np.asarray(t.global_scale), want[2])


def test_native_cpu_handlers_are_built_and_used():
    info = jaxfp4.backend_info()
    assert info["extension"] == "loaded", info["extension"]
    assert {"jaxfp4_quantize", "jaxfp4_gemm_w4a4", "jaxfp4_gemm_w4a16"} <= set(info["targets"]["cpu"])
    with jax.default_device(jax.devices("cpu")[0]):
        x = jnp.ones((4, 32), jnp.float32)
        jax.block_until_ready(jaxfp4.matmul(x, jaxfp4.quantize(x)))
    info = jaxfp4.backend_info()
    assert info["lowered"]["quantize[cpu]"] == "jaxfp4_quantize_dynamic"
    assert info["lowered"]["gemm[cpu]"] == "jaxfp4_gemm_w4a16"
    assert info["kernels_run"]["gemm"] == "cpu"


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
def test_quantize_ragged(rng, layout, m, k):
    x = random_matrix(rng, (m, k))
    _assert_matches_oracle(jaxfp4.quantize(x, sf_layout=layout), x, None, layout)
    g = np.float32(rng.uniform(1e-3, 1.0))
    _assert_matches_oracle(jaxfp4.quantize(x, g, sf_layout=layout), x, g, layout)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
def test_quantize_dtypes_and_batch(rng, dtype, layout):
    x = random_matrix(rng, (2, 3, 9, 48)).astype(dtype)
    _assert_matches_oracle(jaxfp4.quantize(x, sf_layout=layout), x, None, layout)
    g = rng.uniform(1e-3, 1.0, size=(2, 3)).astype(np.float32)
    t = jaxfp4.quantize(x, g, sf_layout=layout)
    assert t.shape == x.shape and t.batch_shape == (2, 3)
    _assert_matches_oracle(t, x, g, layout)


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
def test_quantize_edge_cases(layout):
    x = edge_blocks(64)
    _assert_matches_oracle(jaxfp4.quantize(x, 1.0, sf_layout=layout), x, np.float32(1.0), layout)
    _assert_matches_oracle(jaxfp4.quantize(x, sf_layout=layout), x, None, layout)
    _assert_matches_oracle(jaxfp4.quantize(x, 1e-7, sf_layout=layout), x, np.float32(1e-7), layout)


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dequantize(rng, layout, dtype):
    x = np.concatenate([random_matrix(rng, (2, 129, 48)), np.broadcast_to(edge_blocks(48)[:2], (2, 2, 48))], 1)
    t = jaxfp4.quantize(x, sf_layout=layout)
    got = np.asarray(jaxfp4.dequantize(t, dtype))
    want = oracle.dequantize_f64(np.asarray(t.data), _u8(t.scales), np.asarray(t.global_scale), layout)
    np.testing.assert_array_equal(got, want.astype(np.float32).astype(got.dtype))
    np.testing.assert_array_equal(got, np.asarray(jaxfp4.reference.dequantize(
        t.data, t.scales, t.global_scale, sf_layout=layout, dtype=dtype)))


def _weights(rng, shape, layout="128x4"):
    return jaxfp4.quantize(random_matrix(rng, shape), sf_layout=layout)


def _values(t, with_g=False):
    return oracle.dequantize_f64(np.asarray(t.data), _u8(t.scales), np.asarray(t.global_scale), t.sf_layout,
                                 with_g=with_g)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", [(1, 16), (37, 48), (130, 272)])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_matmul_w4a4_ragged(rng, m, n, k, out_dtype):
    a = jaxfp4.quantize(random_matrix(rng, (m, k)), sf_layout="8x4" if m <= 32 else "128x4")
    b = _weights(rng, (n, k))
    out = jaxfp4.matmul(a, b, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    g = np.asarray(a.global_scale, np.float64) * np.asarray(b.global_scale, np.float64)
    oracle.assert_gemm_close(out, *oracle.gemm_f64(_values(a), _values(b), g), k)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_matmul_w4a16(rng, m, dtype, out_dtype):
    n, k = 45, 272
    a = random_matrix(rng, (m, k), spread=2).astype(dtype)
    b = _weights(rng, (n, k), "linear")
    out = jaxfp4.matmul(a, b, out_dtype=out_dtype)
    ref = oracle.gemm_f64(np.asarray(a).astype(np.float64), _values(b), np.asarray(b.global_scale))
    oracle.assert_gemm_close(out, *ref, k)


def test_matmul_batched_and_broadcast(rng):
    k = 48
    a = jaxfp4.quantize(random_matrix(rng, (3, 1, 5, k)), sf_layout="8x4")   # [3, 1, 5, K]
    b = _weights(rng, (4, 6, k))                                            # [4, 6, K] -> broadcast [3, 4]
    out = jaxfp4.matmul(a, b, out_dtype=jnp.float32)
    assert out.shape == (3, 4, 5, 6)
    g = np.asarray(a.global_scale, np.float64) * np.asarray(b.global_scale, np.float64)
    oracle.assert_gemm_close(out, *oracle.gemm_f64(_values(a), _values(b), g), k)
    x = random_matrix(rng, (2, 3, 5, k)).astype(ml_dtypes.bfloat16)       # shared weights: folded into M
    w = _weights(rng, (6, k))
    out = jaxfp4.matmul(x, w, out_dtype=jnp.float32)
    assert out.shape == (2, 3, 5, 6)
    oracle.assert_gemm_close(out, *oracle.gemm_f64(x.astype(np.float64), _values(w), np.asarray(w.global_scale)), k)


def _bits(x):
    return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize("m", [1, 7, 8, 9, 33])
@pytest.mark.parametrize("packed", [False, True], ids=["plain", "prepared"])
def test_matmul_input_scale_is_quantize_then_matmul(rng, m, packed):
    """matmul(a, w, input_scale=g) is exactly matmul(quantize(a, g), w): any float a, any M."""
    for i, (n, k) in enumerate(((37, 48), (20, 272), (1, 16))):
        w = _weights(rng, (n, k), fmt.SF_LAYOUTS[i % 3])
        w = jaxfp4.prepare_weights(w) if packed else w
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            a = random_matrix(rng, (m, k), spread=2).astype(dtype)
            g = np.float32(np.abs(np.asarray(a, np.float32)).max() / 2688 * rng.uniform(0.5, 2))
            got = jax.jit(lambda a, w, g: jaxfp4.matmul(a, w, input_scale=g, out_dtype=jnp.float32))(a, w, g)
            want = jaxfp4.matmul(jaxfp4.quantize(a, g, sf_layout="8x4"), w, out_dtype=jnp.float32)
            np.testing.assert_array_equal(_bits(got), _bits(want))


def test_matmul_input_scale_batched_vmap_and_jaxpr(rng):
    k = 48
    w = _weights(rng, (6, k))
    x = random_matrix(rng, (2, 3, 5, k)).astype(ml_dtypes.bfloat16)
    # one g: a's batch axes fold into M (one GEMM of 30 rows, 8x4 scales where quantized on its own)
    got = jaxfp4.matmul(x, w, input_scale=0.01)
    want = jaxfp4.matmul(jaxfp4.quantize(x.reshape(30, k), 0.01, sf_layout="8x4"), w).reshape(2, 3, 5, 6)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    (eqn,) = [e for e in jax.make_jaxpr(lambda x: jaxfp4.matmul(x, w, input_scale=0.01))(x).eqns
              if e.primitive.name == "jaxfp4_gemm"]
    assert eqn.params["mode"] == "w4a4_quantize_a" and eqn.params["a_sf_layout"] == "8x4"
    # a g per batch entry, broadcast weights [2, 1, 6, K]
    wb = _weights(rng, (2, 1, 6, k))
    g = np.array([[0.01], [0.02]], np.float32)
    got = jaxfp4.matmul(x, wb, input_scale=g, input_sf_layout="128x4")
    want = jaxfp4.matmul(jaxfp4.quantize(x, np.broadcast_to(g, (2, 3)), sf_layout="128x4"), wb)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    # jax.vmap: each example quantized with the same g
    got = jax.vmap(lambda xi: jaxfp4.matmul(xi, w, input_scale=0.01))(x[0])
    np.testing.assert_array_equal(_bits(got), _bits(jaxfp4.matmul(x[0], w, input_scale=0.01)))


def test_matmul_input_scale_errors(rng):
    w = _weights(rng, (6, 48))
    x = random_matrix(rng, (4, 48))
    with pytest.raises(ValueError, match="already an NVFP4Tensor"):
        jaxfp4.matmul(jaxfp4.quantize(x), w, input_scale=0.1)
    with pytest.raises(ValueError, match="needs input_scale"):
        jaxfp4.matmul(x, w, input_sf_layout="8x4")
    with pytest.raises(ValueError, match="input_sf_layout"):
        jaxfp4.matmul(x, w, input_scale=0.1, input_sf_layout="4x4")
    with pytest.raises(ValueError, match="input_scale must be a scalar or have the leading batch shape"):
        jaxfp4.matmul(x, w, input_scale=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="input_scale must be a float32 scalar"):
        jaxfp4.matmul(x, w, input_scale=np.int32(1))


def test_with_sf_layout_is_exact(rng):
    x = random_matrix(rng, (2, 33, 80))
    t = jaxfp4.quantize(x, sf_layout="128x4")
    for layout in fmt.SF_LAYOUTS:
        u = t.with_sf_layout(layout)
        assert u.sf_layout == layout and u.shape == t.shape
        np.testing.assert_array_equal(np.asarray(jaxfp4.dequantize(u)), np.asarray(jaxfp4.dequantize(t)))
        direct = jaxfp4.quantize(x, sf_layout=layout)
        np.testing.assert_array_equal(_u8(u.scales), _u8(direct.scales))


@pytest.mark.parametrize("m", [9, 17, 32])
@pytest.mark.parametrize("a_layout", ["8x4", "128x4", "linear"])
def test_w4a4_as_w4a16_is_the_w4a4_product(rng, m, a_layout):
    """The GPU's W4A4 route for 9..32 rows with prepared weights (gemm._a4_as_a16:
    a decoded to bf16 once, then W4A16 with g_a * g_b), run here through the CPU
    handlers: the same values as the W4A4 GEMM, bit for bit."""
    from jaxfp4.primitives import gemm

    n, k = 37, 272
    aq = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (m, k))), sf_layout=a_layout)
    wq = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k)))))
    params = dict(b_sf_layout=wq.sf_layout, b_packing=wq.packing, b_shape=(n, k), out_dtype=jnp.float32)
    g_a, g_b = aq.global_scale.reshape(1), wq.global_scale.reshape(1)
    (got,) = gemm._a4_as_a16(aq.data[None], aq.scales[None], g_a, wq.data[None], wq.scales[None], g_b,
                             mode="w4a4", a_sf_layout=a_layout, **params)
    want = jaxfp4.matmul(aq, wq, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want))


def _decoded_reference(x, g):
    """bf16(e2m1(q) * SF) of reference.quantize(x, g), op by op (not under jit: XLA
    may rewrite 1/(1/g) inside one computation, which changes bits the spec fixes)."""
    from jaxfp4 import reference

    data, scales, _ = reference.quantize(x, g, sf_layout="linear")
    return np.asarray(reference.dequantize_unscaled(data, scales, "linear").astype(jnp.bfloat16))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape,g_shape", [((1, 16), ()), ((9, 48), ()), ((33, 272), ()), ((2, 7, 272), (2,)),
                                           ((3, 2, 5, 48), (1, 2))])
def test_quantize_decoded(rng, dtype, shape, g_shape):
    """quantize_decoded_p (gemm's decoded W4A4 route) through the CPU handler: the
    values quantize(x, g) stands for without g, bf16 bit for bit, batch axes and a
    broadcast g included."""
    from jaxfp4.primitives.quantize import quantize_decoded_p

    x = jnp.asarray(random_matrix(rng, shape)).astype(dtype)
    g = jnp.asarray((10.0 ** rng.uniform(-3, 1, size=g_shape)).astype(np.float32))
    g_b = jnp.asarray((10.0 ** rng.uniform(-3, 1, size=g_shape)).astype(np.float32))
    got, g_ab = jax.jit(quantize_decoded_p.bind)(x, g, g_b)
    assert jaxfp4.backend_info()["lowered"]["quantize[cpu]"] == "jaxfp4_quantize_decoded"
    assert got.dtype == jnp.bfloat16 and got.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), _decoded_reference(x, g).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(g_ab), np.asarray(g) * np.asarray(g_b))


def test_quantize_decoded_edge_blocks():
    """NaN, Inf, zero and subnormal-scale blocks decode as the reference's (NaN-aware)."""
    from jaxfp4.primitives.quantize import quantize_decoded_p

    x = jnp.asarray(edge_blocks())
    g = jnp.float32(0.01)
    got = np.asarray(jax.jit(lambda x: quantize_decoded_p.bind(x, g, g)[0])(x), np.float32)
    np.testing.assert_array_equal(got, np.asarray(_decoded_reference(x, g), np.float32))


@pytest.mark.parametrize("m", [1, 3, 9, 17, 32])
def test_w4a4_quantize_decoded_route_is_the_w4a4_product(rng, m):
    """The GPU's one-op W4A4 route for M <= 32 rows with prepared weights
    (gemm._quantize_decoded_then_gemm: a quantized and decoded in one kernel, then
    W4A16 with g_a * g_b, both in one call), as the primitives it equals
    (quantize_decoded_then_gemm_ops) through the CPU handlers: quantize then the
    W4A4 GEMM, bit for bit."""
    from jaxfp4.primitives import gemm
    from jaxfp4.primitives.quantize import quantize_decoded_p

    def quantize_decoded_then_gemm_ops(a, a_g, b_data, b_scales, b_g, **params):
        """What the route's one call computes, as two primitives: quantize_decoded,
        then gemm_p's W4A16 with g_a * g_b (no CPU handler takes packed weights)."""
        a_dec, g = quantize_decoded_p.bind(a, a_g, b_g.reshape(a_g.shape))
        return gemm.gemm_p.bind(a_dec, b_data, b_scales, g, **{**params, "mode": "w4a16", "a_sf_layout": None})

    n, k = 37, 272
    a = jnp.asarray(random_matrix(rng, (m, k))).astype(jnp.bfloat16)
    g_a = jnp.float32(np.abs(np.asarray(a, np.float32)).max() / 2688)
    wq = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k)))))
    params = dict(b_sf_layout=wq.sf_layout, b_packing=wq.packing, b_shape=(n, k), out_dtype=jnp.float32)
    (got,) = jax.jit(lambda a, g: quantize_decoded_then_gemm_ops(
        a[None], g.reshape(1), wq.data[None], wq.scales[None], wq.global_scale.reshape(1),
        mode="w4a4_quantize_a", a_sf_layout="8x4", **params))(a, g_a)
    want = jaxfp4.matmul(jaxfp4.quantize(a, g_a, sf_layout="8x4"), wq, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want))


def test_w4a4_quantize_a_routing():
    """Which one-op W4A4 GEMMs (input_scale) the CUDA lowering runs how: the kernel
    quantizing a itself (M <= 8 rows that fit, M x K <= 8192), quantize_decoded + W4A16 (the other
    M <= 32, prepared weights), else the quantize kernel then the W4A4 GEMM."""
    from jax.core import ShapedArray
    from jaxfp4.primitives import gemm

    def avals(m, k, lead=1):
        f32 = np.float32
        return (ShapedArray((lead, m, k), jnp.bfloat16), ShapedArray((lead,), f32),
                ShapedArray((2, 8 * k), np.uint8), ShapedArray((2, k), ml_dtypes.float8_e4m3fn),
                ShapedArray((1,), f32))

    params = dict(mode="w4a4_quantize_a", a_sf_layout="8x4", b_sf_layout="128x4", b_packing="sm90",
                  b_shape=(32, 4096), out_dtype=jnp.bfloat16)
    for m, k in ((1, 4096), (1, 8192), (2, 4096), (8, 1024)):  # in-kernel quantization: M x K <= 8192
        assert gemm._choose("cuda", avals(m, k), params) is None
    for m, k in ((1, 14336), (4, 4096), (8, 4096), (8, 8192), (3, 14336), (9, 4096), (16, 4096),
                 (gemm.SMALL_M_MAX, 4096)):  # the rest of M <= 32
        assert gemm._choose("cuda", avals(m, k), params)[1] is gemm._quantize_decoded_then_gemm
    assert gemm._choose("cuda", avals(gemm.SMALL_M_MAX + 1, 4096), params)[1] is gemm._quantize_then_gemm
    assert gemm._choose("cuda", avals(16, 4096, lead=3), params)[1] is gemm._quantize_then_gemm  # g_a per entry
    assert gemm._choose("cuda", avals(16, 4096), {**params, "b_packing": None})[1] is gemm._quantize_then_gemm
    assert gemm._choose("cpu", avals(16, 4096), params)[1] is gemm._quantize_then_gemm


def test_w4a4_as_w4a16_routing():
    """Which W4A4 GEMMs the CUDA lowering runs as decode + W4A16 (static shapes only)."""
    from jax.core import ShapedArray
    from jaxfp4.primitives import gemm

    def avals(m, lead=1):
        u8, f8, f32 = np.uint8, ml_dtypes.float8_e4m3fn, np.float32
        return (ShapedArray((lead, m, 64), u8), ShapedArray((lead, 128, 8), f8), ShapedArray((lead,), f32),
                ShapedArray((2, 512), u8), ShapedArray((2, 64), f8), ShapedArray((1,), f32))

    params = dict(mode="w4a4", a_sf_layout="8x4", b_sf_layout="128x4", b_packing="sm90", b_shape=(32, 128),
                  out_dtype=jnp.bfloat16)
    assert gemm._choose("cuda", avals(gemm.A4_AS_A16_MIN_M - 1), params) is None
    for m in (gemm.A4_AS_A16_MIN_M, gemm.SMALL_M_MAX):
        assert gemm._choose("cuda", avals(m), params)[1] is gemm._a4_as_a16
    assert gemm._choose("cuda", avals(16, lead=3), params) is None  # one g_a per batch entry: the W4A4 kernel
    assert gemm._choose("cuda", avals(16), {**params, "b_packing": None}) is None  # checkpoint order
    assert gemm._choose("cpu", avals(16), params)[1] is gemm._unpack_then_gemm  # the CPU handler's W4A4
