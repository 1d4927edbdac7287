"""The pure-JAX reference against the independent numpy oracle (bit-exact)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxfp4 import format as fmt
from jaxfp4 import reference

import oracle
from data import edge_blocks, random_matrix


def _u8(x):
    return np.asarray(x).view(np.uint8)


@pytest.fixture(autouse=True)
def _on_cpu():
    """The reference's bit-exactness contract is on the CPU: XLA's GPU float
    arithmetic may differ by an ulp (on GPUs the CUDA kernels quantize)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
@pytest.mark.parametrize("m,k", [(1, 16), (7, 48), (9, 272), (129, 64)])
def test_quantize_matches_oracle(rng, layout, dtype, m, k):
    x = random_matrix(rng, (2, m, k), dtype)
    for g in (None, np.float32([0.01, 3.0])):
        data, scales, gg = reference.quantize(jnp.asarray(x), g, sf_layout=layout)
        want = oracle.quantize(x.astype(np.float32), g, layout)
        np.testing.assert_array_equal(np.asarray(data), want[0])
        np.testing.assert_array_equal(_u8(scales), want[1])
        np.testing.assert_array_equal(np.asarray(gg), want[2])


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
def test_quantize_edge_cases(layout):
    x = edge_blocks(64)
    data, scales, _ = reference.quantize(jnp.asarray(x), jnp.float32(1.0), sf_layout=layout)
    want = oracle.quantize(x, np.float32(1.0), layout)
    np.testing.assert_array_equal(np.asarray(data), want[0])
    np.testing.assert_array_equal(_u8(scales), want[1])
    lin = _u8(fmt.unswizzle(scales, x.shape[0], 64, layout))
    codes = np.asarray(reference.unpack_codes(data))
    # ties with SF = 1: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 and negatives
    np.testing.assert_array_equal(codes[0, :16], [0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 7, 15])
    assert (lin[1] == 0).all() and (codes[1] == 8).all(), "-0 block: SF 0, codes 0x8"
    assert (lin[3] == 0).all() and set(codes[3]) <= {0, 8}, "underflowing block: SF 0"
    assert lin[4, 0] == 0x7F, "NaN block: SF 0x7F"
    assert lin[5, 0] == 0x7E and codes[5, 5] == 0x7 and lin[5, 1] == 0x7E and codes[5, 20] == 0xF, "Inf saturates"
    assert codes[8, 0] == 0x8, "-0.1 gives -0"
    x_hat = np.asarray(reference.dequantize(data, scales, jnp.float32(1.0), sf_layout=layout))
    assert np.isnan(x_hat[4, :16]).all() and not np.isnan(x_hat[4, 16:]).any(), "NaN stays local to its block"
    assert (x_hat[1] == 0).all() and (x_hat[3] == 0).all()


def test_dynamic_scale_ignores_nan_and_inf():
    x = edge_blocks(64)
    _, _, g = reference.quantize(jnp.asarray(x), sf_layout="linear")
    finite = np.abs(x[np.isfinite(x)]).max()
    assert np.float32(g) == np.float32(finite) / np.float32(2688)
    _, _, g0 = reference.quantize(jnp.zeros((3, 32)), sf_layout="linear")
    assert float(g0) == 1.0


def test_static_scale_too_small_saturates():
    x = np.full((1, 32), 100.0, np.float32)
    data, scales, _ = reference.quantize(jnp.asarray(x), jnp.float32(1e-6), sf_layout="linear")
    assert (_u8(scales) == 0x7E).all() and (np.asarray(data) == 0x77).all()


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
def test_dequantize_exact(rng, layout):
    x = random_matrix(rng, (3, 33, 96))
    data, scales, g = reference.quantize(jnp.asarray(x), sf_layout=layout)
    got = np.asarray(reference.dequantize(data, scales, g, sf_layout=layout))
    want = oracle.dequantize_f64(np.asarray(data), _u8(scales), np.asarray(g), layout)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    rel = np.linalg.norm(got - x) / np.linalg.norm(x)
    assert rel < 0.15, rel  # 4-bit quantization noise, a sanity bound


@pytest.mark.parametrize("a_layout,b_layout", [("8x4", "128x4"), ("linear", "linear"), ("128x4", "8x4")])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_gemm_reference_matches_float64(rng, a_layout, b_layout, out_dtype):
    m, n, k = 9, 37, 272
    a = random_matrix(rng, (2, m, k))
    b = random_matrix(rng, (n, k))
    qa = reference.quantize(jnp.asarray(a), sf_layout=a_layout)
    qb = reference.quantize(jnp.asarray(b), sf_layout=b_layout)
    out = reference.gemm_w4a4(*qa, *qb, a_sf_layout=a_layout, b_sf_layout=b_layout, out_dtype=out_dtype)
    av = oracle.dequantize_f64(np.asarray(qa[0]), _u8(qa[1]), None, a_layout, with_g=False)
    bv = oracle.dequantize_f64(np.asarray(qb[0]), _u8(qb[1]), None, b_layout, with_g=False)
    g = np.asarray(qa[2], np.float64) * np.asarray(qb[2], np.float64)
    oracle.assert_gemm_close(out, *oracle.gemm_f64(av, bv, g), k)
    a16 = a.astype(ml_dtypes.bfloat16)
    out16 = reference.gemm_w4a16(jnp.asarray(a16), *qb, b_sf_layout=b_layout, out_dtype=out_dtype)
    oracle.assert_gemm_close(out16, *oracle.gemm_f64(a16.astype(np.float64), bv, np.asarray(qb[2])), k)


def test_nan_block_in_a_large_tensor():
    # XLA's vectorized CPU max reduction drops NaN from 256 rows of blocks up.
    x = np.ones((300, 64), np.float32)
    x[257, 17] = np.nan
    _, scales, _ = reference.quantize(jnp.asarray(x), jnp.float32(1.0), sf_layout="linear")
    lin = _u8(scales)
    assert lin[257, 1] == 0x7F and (np.delete(lin.ravel(), 257 * 4 + 1) != 0x7F).all()


def test_block_scale_is_not_reassociated():
    # gs * (vmax * R6) and vmax * (gs * R6) differ by an ulp here, flipping SF.
    g = np.frombuffer(np.uint32(0x41C2AAAB).tobytes(), np.float32)[0]
    x = np.zeros((1, 16), np.float32)
    x[0, 0] = 7.12890625
    _, scales, _ = reference.quantize(jnp.asarray(x), jnp.float32(g), sf_layout="linear")
    assert _u8(scales)[0, 0] == oracle.quantize(x, g, "linear")[1][0, 0] == 0x15


@pytest.mark.parametrize("layout", ["linear", "8x4"])
def test_quantize_under_jit_matches_oracle(rng, layout):
    # Inside jit XLA may simplify 1/(1/g) to g and reassociate products; the
    # reference must stay the spec's arithmetic (it is the fallback lowering).
    x = np.concatenate([random_matrix(rng, (300, 512), spread=20), edge_blocks(512)])
    g = np.float32(rng.uniform(1e-3, 10.0, size=(4,)))
    for gg in [None, *g]:
        data, scales, g_out = jax.jit(lambda v, s: reference.quantize(v, s, sf_layout=layout))(x, gg)
        want = oracle.quantize(x, gg, layout)
        np.testing.assert_array_equal(np.asarray(data), want[0])
        np.testing.assert_array_equal(_u8(scales), want[1])
