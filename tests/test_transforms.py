"""jit, eval_shape and vmap over the primitives: exact agreement with
per-element calls, any vmapped axis, nested vmap, shared or batched weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4 import format as fmt

from data import random_matrix


def _leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8) if x.dtype.itemsize == 1 else np.asarray(x),
                                      np.asarray(y).view(np.uint8) if y.dtype.itemsize == 1 else np.asarray(y))


def test_jit_equals_eager_and_eval_shape(rng):
    x = random_matrix(rng, (9, 48))
    for layout in fmt.SF_LAYOUTS:
        f = lambda v: jaxfp4.quantize(v, sf_layout=layout)
        _leaves_equal(jax.jit(f)(x), f(x))
        s = jax.eval_shape(f, jax.ShapeDtypeStruct((2, 9, 48), jnp.bfloat16))
        assert s.data.shape == (2, 9, 24) and s.data.dtype == jnp.uint8
        assert s.scales.shape == (2, *fmt.scale_shape(9, 48, layout)) and s.scales.dtype == jnp.float8_e4m3fn
        assert s.global_scale.shape == (2,) and s.sf_layout == layout
    w = jaxfp4.quantize(random_matrix(rng, (20, 48)))
    out = jax.eval_shape(lambda a, b: jaxfp4.matmul(a, b, out_dtype=jnp.float16),
                         jax.ShapeDtypeStruct((3, 7, 48), jnp.bfloat16), w)
    assert out.shape == (3, 7, 20) and out.dtype == jnp.float16
    a = jaxfp4.quantize(random_matrix(rng, (7, 48)), sf_layout="8x4")
    np.testing.assert_array_equal(np.asarray(jax.jit(jaxfp4.matmul)(a, w)), np.asarray(jaxfp4.matmul(a, w)))


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("layout", ["8x4", "128x4", "linear"])
@pytest.mark.parametrize("static_g", [False, True])
def test_vmap_quantize_any_axis(rng, axis, layout, static_g):
    x = random_matrix(rng, (3, 5, 32))  # vmapped over `axis`; each element is a matrix of the rest
    x = np.moveaxis(x, 0, axis)
    g = np.float32(0.01) if static_g else None
    got = jax.vmap(lambda v: jaxfp4.quantize(v, g, sf_layout=layout), in_axes=axis)(x)
    parts = [jaxfp4.quantize(np.take(x, i, axis=axis), g, sf_layout=layout) for i in range(x.shape[axis])]
    _leaves_equal(got, jax.tree.map(lambda *p: jnp.stack(p), *parts))
    # swizzled scales stay padded per batch entry
    assert got.scales.shape == (3, *fmt.scale_shape(*np.take(x, 0, axis=axis).shape, layout))


def test_vmap_quantize_batched_global_scale(rng):
    x = random_matrix(rng, (4, 2, 9, 32))
    g = rng.uniform(0.01, 1, size=(4,)).astype(np.float32)
    got = jax.vmap(lambda v, s: jaxfp4.quantize(v, s, sf_layout="8x4"))(x, g)
    parts = [jaxfp4.quantize(x[i], g[i], sf_layout="8x4") for i in range(4)]
    _leaves_equal(got, jax.tree.map(lambda *p: jnp.stack(p), *parts))


def test_nested_vmap_quantize_dequantize(rng):
    x = random_matrix(rng, (2, 3, 9, 32))
    f = lambda v: jaxfp4.dequantize(jaxfp4.quantize(v, sf_layout="128x4"))
    got = jax.vmap(jax.vmap(f))(x)
    want = np.stack([np.stack([np.asarray(f(x[i, j])) for j in range(3)]) for i in range(2)])
    np.testing.assert_array_equal(np.asarray(got), want)


def _stack(fn, n):
    return np.stack([np.asarray(fn(i)) for i in range(n)])


@pytest.mark.parametrize("w4a4", [True, False])
def test_vmap_matmul_shared_weights(rng, w4a4):
    xs = random_matrix(rng, (4, 7, 48)).astype(jnp.bfloat16)
    w = jaxfp4.quantize(random_matrix(rng, (20, 48)))
    prep = (lambda v: jaxfp4.quantize(v, sf_layout="8x4")) if w4a4 else (lambda v: v)
    f = lambda v: jaxfp4.matmul(prep(v), w, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(xs)), _stack(lambda i: f(xs[i]), 4))
    # vmapped over the middle axis of the activations
    xt = jnp.swapaxes(xs, 0, 1)  # [7, 4, 48]: vmap over axis 1
    np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=1)(xt)), _stack(lambda i: f(xt[:, i]), 4))


@pytest.mark.parametrize("w4a4", [True, False])
def test_vmap_matmul_batched_weights(rng, w4a4):
    x = random_matrix(rng, (3, 5, 32)).astype(jnp.bfloat16)
    ws = jaxfp4.quantize(random_matrix(rng, (3, 11, 32)), sf_layout="linear")
    prep = (lambda v: jaxfp4.quantize(v, sf_layout="8x4")) if w4a4 else (lambda v: v)
    f = lambda v, w: jaxfp4.matmul(prep(v), w, out_dtype=jnp.float32)
    w_i = lambda i: jax.tree.map(lambda l: l[i], ws)
    # weights batched, activations shared
    np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=(None, 0))(x[0], ws)),
                                  _stack(lambda i: f(x[0], w_i(i)), 3))
    # both batched
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x, ws)), _stack(lambda i: f(x[i], w_i(i)), 3))
    # nested: outer over weights, inner over activations
    got = jax.vmap(lambda w: jax.vmap(lambda v: f(v, w))(x))(ws)
    want = np.stack([_stack(lambda j: f(x[j], w_i(i)), 3) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got), want)


def test_vmap_matmul_weights_mapped_on_inner_axis(rng):
    x = random_matrix(rng, (5, 32)).astype(jnp.bfloat16)
    data = random_matrix(rng, (11, 3, 32))  # vmapped over axis 1 of the float weights, quantized inside
    f = lambda wf: jaxfp4.matmul(x, jaxfp4.quantize(wf, sf_layout="128x4"), out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.vmap(f, in_axes=1)(data)), _stack(lambda i: f(data[:, i]), 3))


def test_scan_over_stacked_weights(rng):
    x = random_matrix(rng, (4, 64)).astype(jnp.bfloat16)
    ws = jaxfp4.quantize(random_matrix(rng, (3, 64, 64)))

    def body(h, w):
        return jaxfp4.matmul(h, w).astype(jnp.bfloat16), None

    out, _ = jax.jit(lambda h, w: jax.lax.scan(body, h, w))(x, ws)
    h = x
    for i in range(3):
        h = jaxfp4.matmul(h, jax.tree.map(lambda l: l[i], ws)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(h))
