"""Bad input fails at trace time with a ValueError/TypeError naming the argument and the rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4


@pytest.fixture
def w():
    return jaxfp4.quantize(jnp.ones((8, 32), jnp.float32))


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)
    with pytest.raises(exc, match=match):  # the same at trace time under jit
        jax.jit(lambda *a: fn(*a, **kw))(*args)


def test_quantize_k_multiple_of_16():
    _raises(ValueError, r"x: the last axis K=40 must be a multiple of 16", jaxfp4.quantize, jnp.ones((4, 40)))


def test_quantize_dtype():
    _raises(TypeError, r"x.dtype must be float32, bfloat16 or float16, got int32", jaxfp4.quantize,
            jnp.ones((4, 32), jnp.int32))


def test_quantize_rank():
    _raises(ValueError, r"x must have rank >= 2", jaxfp4.quantize, jnp.ones((32,)))


def test_quantize_layout():
    with pytest.raises(ValueError, match=r"sf_layout must be one of \('linear', '128x4', '8x4'\), got '4x8'"):
        jaxfp4.quantize(jnp.ones((4, 32)), sf_layout="4x8")


def test_quantize_global_scale_shape():
    _raises(ValueError, r"global_scale must be a scalar or have the leading batch shape \(2,\)",
            jaxfp4.quantize, jnp.ones((2, 4, 32)), jnp.ones((3,)))
    _raises(ValueError, r"global_scale must be a scalar", jaxfp4.quantize, jnp.ones((4, 32)), jnp.ones((4,)))
    _raises(TypeError, r"global_scale must be a float32 scalar", jaxfp4.quantize, jnp.ones((4, 32)), jnp.int32(1))


def test_matmul_b_type(w):
    _raises(TypeError, r"b must be an NVFP4Tensor", jaxfp4.matmul, jnp.ones((4, 32)), jnp.ones((8, 32)))


def test_matmul_k_mismatch(w):
    _raises(ValueError, r"a and b must share K: .*K=48.*K=32", jaxfp4.matmul, jnp.ones((4, 48), jnp.bfloat16), w)
    a = jaxfp4.quantize(jnp.ones((4, 64)))
    _raises(ValueError, r"a and b must share K", jaxfp4.matmul, a, w)


def test_matmul_a_dtype_and_rank(w):
    _raises(TypeError, r"a.dtype must be float32, bfloat16 or float16, got int8", jaxfp4.matmul,
            jnp.ones((4, 32), jnp.int8), w)
    _raises(ValueError, r"a must have rank >= 2", jaxfp4.matmul, jnp.ones((32,), jnp.bfloat16), w)
    with pytest.raises(TypeError, match=r"a must be an array"):
        jaxfp4.matmul([[1.0] * 32], w)


def test_matmul_out_dtype(w):
    with pytest.raises(TypeError, match=r"out_dtype must be float32, bfloat16 or float16, got int32"):
        jaxfp4.matmul(jnp.ones((4, 32), jnp.bfloat16), w, out_dtype=jnp.int32)


def test_matmul_batch_broadcast(w):
    ws = jaxfp4.quantize(jnp.ones((3, 8, 32)))
    a = jnp.ones((2, 4, 32), jnp.bfloat16)
    _raises(ValueError, r"leading batch axes of a \(2,\) and b \(3,\) do not broadcast", jaxfp4.matmul, a, ws)


def test_dequantize_and_friends_type_errors():
    with pytest.raises(TypeError, match=r"t must be an NVFP4Tensor"):
        jaxfp4.dequantize(jnp.ones((4, 32)))
    with pytest.raises(TypeError, match=r"dtype must be float32, bfloat16 or float16"):
        jaxfp4.dequantize(jaxfp4.quantize(jnp.ones((4, 32))), jnp.int8)
    with pytest.raises(TypeError, match=r"data_f4 must have dtype float4_e2m1fn"):
        jaxfp4.from_float4(jnp.ones((4, 32)), jnp.ones((4, 2), jnp.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"scales must be LINEAR with shape \(4, 2\)"):
        jaxfp4.from_float4(jnp.ones((4, 32), jnp.float4_e2m1fn), jnp.ones((4, 3), jnp.float8_e4m3fn))


def test_non_float_array_like_is_converted_or_rejected():
    with pytest.raises(TypeError, match=r"x must be an array"):
        jaxfp4.quantize([[1.0] * 32])
    t = jaxfp4.quantize(np.ones((4, 32), np.float32))  # numpy arrays are fine
    assert t.shape == (4, 32)


def test_matmul_rejects_prepacked_activations(w):
    a = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.ones((4, 32))))
    _raises(ValueError, r"a must not be pre-packed", jaxfp4.matmul, a, w)
