"""jaxfp4.dot_general / NVFP4DotGeneral as drop-ins for nn.Dense and nnx.Linear:
equal to the same computation spelled with jaxfp4.quantize/matmul, close to float."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxfp4
from jaxfp4.flax import NVFP4DotGeneral

from data import random_matrix

DN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N], what Dense uses


def _want(x, kernel_kn, mode="w4a16", out_dtype=None, threshold=32):
    """x [..., K] @ kernel [K, N] through the public ops."""
    k, n = kernel_kn.shape
    w = jaxfp4.quantize(jnp.asarray(kernel_kn).T, sf_layout="linear")
    a = jnp.asarray(x).reshape(-1, k)
    if mode == "w4a4":
        a = jaxfp4.quantize(a, sf_layout="8x4" if a.shape[0] <= threshold else "128x4")
    out_dtype = out_dtype or jnp.result_type(x.dtype, kernel_kn.dtype)
    return jaxfp4.matmul(a, w, out_dtype=out_dtype).reshape(*x.shape[:-1], n)


def _close_to_float(got, x, kernel, mode="w4a16"):
    """Relative L2 error vs float64 within bounds set from 200 seeds (x2.5 for tiny outputs)."""
    tol = {"w4a16": 0.15, "w4a4": 0.2}[mode] * (2.5 if got.size < 100 else 1.0)
    ref = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    err = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
    assert err < tol, err


def _eq(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
@pytest.mark.parametrize("shape,k,n", [((1, 48), 48, 20), ((7, 272), 272, 40), ((3, 11, 48), 48, 24)])
def test_function_equals_ops(rng, mode, shape, k, n):
    x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    kernel = jnp.asarray(random_matrix(rng, (n, k), spread=2).T)  # [K, N] f32
    dn = (((x.ndim - 1,), (0,)), ((), ()))
    got = jax.jit(lambda a, b: jaxfp4.dot_general(a, b, dn, mode=mode))(x, kernel)
    _eq(got, _want(x, kernel, mode))
    assert got.dtype == jnp.float32  # promoted, like lax.dot_general
    _close_to_float(got, x, kernel, mode)


def test_rhs_orientations_and_dtypes(rng):
    x = jnp.asarray(rng.standard_normal((5, 48)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((48, 20)), jnp.float32)
    want = _want(x, kernel, out_dtype=jnp.float16)
    # [N, K] weights (contract rhs axis 1) and a negative axis give the same
    _eq(jaxfp4.dot_general(x, kernel.T, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float16), want)
    _eq(jaxfp4.dot_general(x, kernel, (((-1,), (-2,)), ((), ())), preferred_element_type=jnp.float16), want)
    # DenseGeneral-like rhs [K, 4, 5]: output [..., 4, 5]
    got = jaxfp4.dot_general(x, kernel.reshape(48, 4, 5), DN, preferred_element_type=jnp.float16)
    _eq(got, want.reshape(5, 4, 5))
    # precision is accepted (and ignored)
    _eq(jaxfp4.dot_general(x, kernel, DN, jax.lax.Precision.HIGHEST, jnp.float16), want)


@pytest.mark.parametrize("m", [7, 33])
def test_linen_dense_dot_general(rng, m):
    x = jnp.asarray(rng.standard_normal((m, 48)), jnp.float32)
    layer = nn.Dense(40, dot_general=jaxfp4.dot_general)
    params = layer.init(jax.random.key(0), x)
    kernel, bias = params["params"]["kernel"], params["params"]["bias"]
    got = jax.jit(layer.apply)(params, x)
    _eq(got, _want(x, kernel) + bias)
    _close_to_float(got, x, kernel)


@pytest.mark.parametrize("m,threshold,layout", [(7, 32, "8x4"), (33, 32, "128x4"), (7, 4, "128x4")])
def test_linen_dense_dot_general_cls(rng, m, threshold, layout):
    x = jnp.asarray(rng.standard_normal((m, 272)), jnp.bfloat16)
    cls = partial(NVFP4DotGeneral, mode="w4a4", small_batch_threshold=threshold)
    layer = nn.Dense(24, use_bias=False, dtype=jnp.bfloat16, dot_general_cls=cls)
    params = layer.init(jax.random.key(1), x)
    kernel = params["params"]["kernel"].astype(jnp.bfloat16)
    got = layer.apply(params, x)
    _eq(got, _want(x, kernel, "w4a4", threshold=threshold))
    _close_to_float(got, x, kernel, "w4a4")
    jaxpr = jax.make_jaxpr(layer.apply)(params, x)
    assert f"a_sf_layout={layout}" in str(jaxpr)
    # the default class: weight-only
    plain = nn.Dense(24, use_bias=False, dtype=jnp.bfloat16, dot_general_cls=NVFP4DotGeneral)
    _eq(plain.apply(params, x), _want(x, kernel))


def test_nnx_linear(rng):
    x = jnp.asarray(rng.standard_normal((2, 9, 48)), jnp.bfloat16)
    layer = nnx.Linear(48, 20, dot_general=jaxfp4.dot_general, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    got = nnx.jit(lambda mod, v: mod(v))(layer, x)
    kernel, bias = layer.kernel[...].astype(jnp.bfloat16), layer.bias[...].astype(jnp.bfloat16)
    _eq(got, _want(x, kernel) + bias)
    _close_to_float(got, x, kernel)
    w4a4 = nnx.Linear(48, 20, dot_general=NVFP4DotGeneral(mode="w4a4"), rngs=nnx.Rngs(0))
    _eq(w4a4(x.astype(jnp.float32)), _want(x.astype(jnp.float32), w4a4.kernel[...], "w4a4") + w4a4.bias[...])


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("as_spec", [False, True])
def test_out_sharding(rng, axis_type, as_spec):
    # All on the CPU devices (4 from conftest.py's XLA_FLAGS), also where the default
    # backend is a GPU: the mesh, the inputs (committed to it) and the reference.
    cpus = jax.devices("cpu")
    if len(cpus) < 4:
        pytest.skip(f"needs 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4), got {len(cpus)}")
    mesh = jax.make_mesh((4,), ("x",), (axis_type,), devices=cpus[:4])
    sharding = NamedSharding(mesh, P("x", None))
    x = rng.standard_normal((8, 48)).astype(np.float32)
    kernel = rng.standard_normal((48, 20)).astype(np.float32)
    with jax.set_mesh(mesh):
        f = lambda a, b: jaxfp4.dot_general(a, b, DN, out_sharding=sharding.spec if as_spec else sharding)
        got = jax.jit(f)(*jax.device_put((x, kernel), NamedSharding(mesh, P())))
    assert got.sharding.is_equivalent_to(sharding, 2)
    assert got.sharding.device_set == set(cpus[:4])
    with jax.default_device(cpus[0]):
        want = _want(x, kernel)
    _eq(got, want)


@pytest.mark.parametrize("args,kw,exc,match", [
    ((jnp.ones((2, 3, 32)), jnp.ones((2, 32, 8)), (((2,), (1,)), ((0,), (0,)))), {},
     NotImplementedError, r"batch dimensions are not supported"),
    ((jnp.ones((32, 4)), jnp.ones((32, 8)), (((0,), (0,)), ((), ()))), {},
     NotImplementedError, r"lhs must contract its last axis \(1\), got axis 0"),
    ((jnp.ones((4, 2, 16)), jnp.ones((2, 16, 8)), (((1, 2), (0, 1)), ((), ()))), {},
     NotImplementedError, r"exactly one contracting axis"),
    ((jnp.ones((4, 40)), jnp.ones((40, 8)), DN), {}, ValueError, r"K=40 must be a multiple of 16"),
    ((jnp.ones((4, 32)), jnp.ones((48, 8)), DN), {}, ValueError, r"contracting dims differ"),
    ((jnp.ones((4, 32), jnp.int32), jnp.ones((32, 8)), DN), {}, TypeError, r"lhs.dtype must be float32"),
    ((jnp.ones((4, 32)), jnp.ones((32,)), (((1,), (0,)), ((), ()))), {}, ValueError, r"rhs rank >= 2"),
    ((jnp.ones((4, 32)), jnp.ones((32, 8)), DN), {"mode": "w8a8"}, ValueError, r"mode must be one of"),
    ((jnp.ones((4, 32)), jnp.ones((32, 8)), DN), {"preferred_element_type": jnp.int8}, TypeError,
     r"preferred_element_type must be float32"),
])
def test_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        jax.jit(lambda a, b: jaxfp4.dot_general(a, b, args[2], **kw))(args[0], args[1])
