"""Exact conversion to and from jnp.float4_e2m1fn (jax.nn.scaled_matmul, qwix)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4 import format as fmt

import oracle
from data import edge_blocks, random_matrix


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
def test_round_trip_is_exact(rng, layout):
    x = np.concatenate([random_matrix(rng, (33, 64)), edge_blocks(64)])
    t = jaxfp4.quantize(x, sf_layout=layout)
    data_f4, scales, g = jaxfp4.to_scaled_matmul_operands(t)
    assert data_f4.dtype == jnp.float4_e2m1fn and data_f4.shape == (45, 64)
    assert scales.dtype == jnp.float8_e4m3fn and scales.shape == (45, 4)
    back = jaxfp4.from_float4(data_f4, scales, g, sf_layout=layout)
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(t.data))  # -0 codes survive too
    np.testing.assert_array_equal(np.asarray(back.scales).view(np.uint8), np.asarray(t.scales).view(np.uint8))
    # float4 values times linear scales times g are the tensor's values
    vals = np.asarray(data_f4.astype(jnp.float32)) * np.repeat(np.asarray(scales.astype(jnp.float32)), 16, -1) * float(g)
    np.testing.assert_array_equal(vals, np.asarray(jaxfp4.dequantize(t)))


def test_scaled_matmul_agrees(rng):
    m, n, k = 8, 24, 64
    a = jaxfp4.quantize(random_matrix(rng, (m, k), spread=2), sf_layout="8x4")
    b = jaxfp4.quantize(random_matrix(rng, (n, k), spread=2))
    ad, asc, ag = jaxfp4.to_scaled_matmul_operands(a)
    bd, bsc, bg = jaxfp4.to_scaled_matmul_operands(b)
    ref = jax.nn.scaled_matmul(ad[None], bd[None], asc[None], bsc[None], preferred_element_type=jnp.float32)[0]
    ref = np.asarray(ref, np.float64) * float(ag) * float(bg)
    out = np.asarray(jaxfp4.matmul(a, b, out_dtype=jnp.float32), np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
