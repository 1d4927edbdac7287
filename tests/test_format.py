"""Spec section 1-3 facts: element coding, E4M3 rounding, layout offsets."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxfp4 import format as fmt
from jaxfp4 import reference

import oracle


def test_e2m1_ties_and_sign():
    v = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, -0.0, 0.0, 7.0, np.inf, -np.inf, np.nan, 0.26, 5.01],
                 np.float32)
    want = [0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6, 0x8, 0x8, 0x0, 0x7, 0x7, 0xF, 0x7, 0x1, 0x7]
    np.testing.assert_array_equal(np.asarray(reference.e2m1_encode(jnp.asarray(v))), want)
    np.testing.assert_array_equal(oracle.e2m1_code(v), want)


def test_e2m1_decode_table():
    codes = jnp.arange(16, dtype=jnp.uint8)
    vals = np.asarray(reference.e2m1_decode(codes))
    np.testing.assert_array_equal(vals, oracle.E2M1)
    # ml_dtypes' float4_e2m1fn agrees on the magnitude codes 0..7.
    np.testing.assert_array_equal(vals[:8], np.arange(8, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert np.signbit(vals[8]) and vals[8] == 0


def test_e2m1_round_trips_all_codes():
    codes = jnp.arange(16, dtype=jnp.uint8)
    np.testing.assert_array_equal(np.asarray(reference.e2m1_encode(reference.e2m1_decode(codes))), np.arange(16))


def test_e4m3_satfinite(rng):
    v = np.abs(rng.standard_normal(100_000).astype(np.float32)) * np.exp2(rng.integers(-14, 10, 100_000)).astype(np.float32)
    v = np.concatenate([v, np.float32([2.0**-10, 2.0**-10 * 1.001, 448, 449, 464, 1e30, np.inf, np.nan, 0])])
    got = np.asarray(reference.e4m3_satfinite(jnp.asarray(v))).view(np.uint8)
    np.testing.assert_array_equal(got, oracle.e4m3_byte(v))
    np.testing.assert_array_equal(got[-9:], [0x00, 0x01, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7F, 0x00])


@pytest.mark.parametrize("layout,cases", [
    ("128x4", [((0, 1), 1), ((1, 0), 16), ((32, 0), 4), ((64, 3), 11), ((127, 3), 511), ((0, 4), 512), ((128, 0), 1024)]),
    ("8x4", [((1, 0), 4), ((7, 3), 31), ((0, 4), 32), ((8, 0), 64)]),
])
def test_worked_offsets(layout, cases):
    for (m, c), off in cases:
        assert fmt.scale_offset(m, c, 8 * 16, layout) == off
        assert oracle.offset(m, c, 8, layout) == off


@pytest.mark.parametrize("layout", fmt.SF_LAYOUTS)
@pytest.mark.parametrize("rows,k", [(1, 16), (7, 48), (129, 272), (300, 64)])
def test_swizzle_matches_offsets_and_pads_with_zero(rng, layout, rows, k):
    c = k // 16
    lin = rng.integers(1, 255, size=(2, rows, c)).astype(np.uint8)
    sw = np.asarray(fmt.swizzle(jnp.asarray(lin).view(jnp.float8_e4m3fn), layout)).view(np.uint8)
    assert sw.shape == (2, *fmt.scale_shape(rows, k, layout))
    flat = sw.reshape(2, -1)
    mm, cc = np.meshgrid(np.arange(rows), np.arange(c), indexing="ij")
    offs = fmt.scale_offset(mm, cc, k, layout)
    np.testing.assert_array_equal(flat[:, offs], lin)
    mask = np.ones(flat.shape[1], bool)
    mask[offs.ravel()] = False
    assert (flat[:, mask] == 0).all(), "padded scale entries must be 0x00"
    back = np.asarray(fmt.unswizzle(jnp.asarray(sw).view(jnp.float8_e4m3fn), rows, k, layout)).view(np.uint8)
    np.testing.assert_array_equal(back, lin)


def test_m1_padding_sizes():
    assert fmt.scale_shape(1, 4096, "128x4") == (128, 256)
    assert fmt.scale_shape(1, 4096, "8x4") == (8, 256)
    assert fmt.scale_shape(1, 4096, "linear") == (1, 256)
