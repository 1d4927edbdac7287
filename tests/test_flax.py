"""jaxfp4.flax: the NVFP4 Dense (init, apply vs jaxfp4.matmul, activation scale
layout, jit/vmap/scan/remat, errors), dense_params and quantize_params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4.flax import Dense, dense_params, quantize_params

from data import random_matrix


def _tensor(p):
    """The NVFP4Tensor [N, K] a Dense param dict holds (plain order)."""
    return jaxfp4.NVFP4Tensor(p["weight"], p["weight_scale"], p["weight_scale_2"], "linear")


def _eq(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _gemm_params(jaxpr):
    """The params of every jaxfp4_gemm equation in a (closed) jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
        if eqn.primitive.name == "jaxfp4_gemm":
            found.append(eqn.params)
        for v in eqn.params.values():
            if isinstance(v, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                found += _gemm_params(v)
    return found


def _params(rng, n, k, *, bias=False, input_scale=None, packing=None):
    w = jaxfp4.quantize(random_matrix(rng, (n, k), spread=2), sf_layout="128x4")
    b = jnp.asarray(rng.standard_normal(n), jnp.bfloat16) if bias else None
    return w, {"params": dense_params(w, input_scale=input_scale, bias=b, packing=packing)}


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
@pytest.mark.parametrize("packing", [None, "sm90"])
def test_init_shapes(mode, packing):
    x = jnp.ones((3, 272), jnp.bfloat16)
    layer = Dense(40, use_bias=True, mode=mode, weight_packing=packing, static_input_scale=mode == "w4a4")
    p = layer.init(jax.random.key(0), x)["params"]
    shapes = {k: (v.shape, v.dtype) for k, v in p.items()}
    dw, ds = ((40, 136), (40, 17)) if packing is None else jaxfp4.packing.packed_shapes(40, 272)
    want = {"weight": (dw, jnp.uint8), "weight_scale": (ds, jnp.float8_e4m3fn),
            "weight_scale_2": ((), jnp.float32), "bias": ((40,), jnp.bfloat16)}
    if mode == "w4a4":
        want["input_scale"] = ((), jnp.float32)
    assert shapes == want
    # .init quantizes kernel_init's kernel [K, N], transposed
    kernel = nn.initializers.lecun_normal()(jax.random.key(7), (272, 40), jnp.float32)
    p2 = Dense(40, kernel_init=lambda *_: kernel).init(jax.random.key(0), x)["params"]
    _eq(jaxfp4.dequantize(_tensor(p2)), jaxfp4.dequantize(jaxfp4.quantize(kernel.T)))


@pytest.mark.parametrize("m,k,n", [(1, 48, 20), (7, 272, 40), (33, 48, 24)])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_apply_equals_matmul(rng, m, k, n, mode):
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w, params = _params(rng, n, k, bias=True)
    layer = Dense(n, use_bias=True, mode=mode)
    got = jax.jit(layer.apply)(params, x)
    a = x.astype(jnp.bfloat16)
    if mode == "w4a4":
        a = jaxfp4.quantize(a, sf_layout="8x4" if m <= 32 else "128x4")
    _eq(got, jaxfp4.matmul(a, w) + params["params"]["bias"])
    # the same values from pre-packed params
    plain = {"params": dense_params(jaxfp4.unprepare_weights(jaxfp4.prepare_weights(w)))}
    packed = {"params": dense_params(w, packing="sm90")}
    _eq(Dense(n, mode=mode, weight_packing="sm90").apply(packed, x), Dense(n, mode=mode).apply(plain, x))


def test_static_input_scale_and_leading_dims(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 48)), jnp.float16)
    g_a = np.float32(0.004)
    w, params = _params(rng, 24, 48, input_scale=g_a)
    layer = Dense(24, mode="w4a4", dtype=jnp.float32, static_input_scale=True)
    got = layer.apply(params, x)
    a = jaxfp4.quantize(x.reshape(24, 48).astype(jnp.float32), g_a, sf_layout="8x4")
    _eq(got, jaxfp4.matmul(a, w, out_dtype=jnp.float32).reshape(2, 3, 4, 24))
    # 1-D x is one token
    _eq(layer.apply(params, x[0, 0, 0]), got[0, 0, 0])


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_out_dtype(rng, mode):
    """out_dtype=float32 with bfloat16 compute (an lm_head's float32 logits): one
    matmul with a float32 result, not a bfloat16 one cast up; the bias too."""
    x = jnp.asarray(rng.standard_normal((5, 48)), jnp.float32)
    w, params = _params(rng, 20, 48, bias=True)
    got = jax.jit(Dense(20, use_bias=True, mode=mode, out_dtype=jnp.float32).apply)(params, x)
    assert got.dtype == jnp.float32
    a = x.astype(jnp.bfloat16)
    if mode == "w4a4":
        a = jaxfp4.quantize(a, sf_layout="8x4")
    bias = params["params"]["bias"].astype(jnp.bfloat16).astype(jnp.float32)
    _eq(got, jaxfp4.matmul(a, w, out_dtype=jnp.float32) + bias)
    rounded = Dense(20, use_bias=True, mode=mode).apply(params, x)  # bfloat16 out
    assert rounded.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(got), np.asarray(rounded.astype(jnp.float32)))


@pytest.mark.parametrize("m,threshold,layout", [(1, 32, "8x4"), (32, 32, "8x4"), (33, 32, "128x4"),
                                                (7, 4, "128x4")])
def test_activation_layout_in_jaxpr(rng, m, threshold, layout):
    _, params = _params(rng, 20, 48)
    x = jnp.ones((m, 48), jnp.bfloat16)
    layer = Dense(20, mode="w4a4", small_batch_threshold=threshold)
    (gemm,) = _gemm_params(jax.make_jaxpr(layer.apply)(params, x))
    assert gemm["a_sf_layout"] == layout and gemm["mode"] == "w4a4"
    (gemm,) = _gemm_params(jax.make_jaxpr(Dense(20).apply)(params, x))
    assert gemm["a_sf_layout"] is None and gemm["mode"] == "w4a16"


@pytest.mark.parametrize("m,threshold,layout", [(1, 32, "8x4"), (33, 32, "128x4"), (7, 4, "128x4")])
def test_static_input_scale_is_one_op(rng, m, threshold, layout):
    """With a static input scale, W4A4 is one GEMM that quantizes its input (on the
    GPU in the kernel for decode-size M), the layout still chosen by the threshold."""
    _, params = _params(rng, 20, 48, input_scale=np.float32(0.01))
    layer = Dense(20, mode="w4a4", static_input_scale=True, small_batch_threshold=threshold)
    x = jnp.asarray(rng.standard_normal((m, 48)), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(layer.apply)(params, x)
    (gemm,) = _gemm_params(jaxpr)
    assert gemm["mode"] == "w4a4_quantize_a" and gemm["a_sf_layout"] == layout
    assert not any(e.primitive.name == "jaxfp4_quantize" for e in jaxpr.jaxpr.eqns)


def test_vmap(rng):
    x = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.bfloat16)
    w, params = _params(rng, 20, 48)
    layer = Dense(20, mode="w4a4")
    # jax.vmap of apply: shared weights, each example quantized on its own (8x4, M=5)
    got = jax.jit(jax.vmap(lambda v: layer.apply(params, v)))(x)
    for i in range(3):
        _eq(got[i], jaxfp4.matmul(jaxfp4.quantize(x[i], sf_layout="8x4"), w))
    # nn.vmap: one weight per example
    vdense = nn.vmap(Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0)
    vlayer = vdense(20)
    vparams = vlayer.init(jax.random.key(0), x)
    assert vparams["params"]["weight"].shape == (3, 20, 24)
    got = jax.jit(vlayer.apply)(vparams, x)
    for i in range(3):
        p_i = jax.tree.map(lambda v: v[i], vparams["params"])
        _eq(got[i], jaxfp4.matmul(x[i], _tensor(p_i)))
    assert not np.array_equal(np.asarray(vparams["params"]["weight"][0]), np.asarray(vparams["params"]["weight"][1]))


class _Block(nn.Module):
    mode: str = "w4a16"

    @nn.compact
    def __call__(self, c, _):
        return Dense(48, use_bias=True, mode=self.mode, name="fc")(c), None


@pytest.mark.parametrize("mode", ["w4a16", "w4a4"])
def test_scan_and_remat(rng, mode):
    x = jnp.asarray(rng.standard_normal((7, 48)), jnp.bfloat16)
    stack = nn.scan(nn.remat(_Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    model = stack(mode=mode)
    params = model.init(jax.random.key(0), x, None)
    (got, _) = jax.jit(model.apply)(params, x, None)
    c = x
    for i in range(3):
        p_i = jax.tree.map(lambda v: v[i], params["params"]["fc"])
        a = c if mode == "w4a16" else jaxfp4.quantize(c, sf_layout="8x4")
        c = jaxfp4.matmul(a, _tensor(p_i)) + p_i["bias"]
    _eq(got, c)


def test_dense_params_any_layout(rng):
    x = jnp.asarray(rng.standard_normal((9, 272)), jnp.bfloat16)
    w = jaxfp4.quantize(random_matrix(rng, (40, 272)), sf_layout="8x4")
    for t in (w, w.with_sf_layout("linear"), jaxfp4.prepare_weights(w)):
        p = dense_params(t)
        assert p["weight_scale"].shape == (40, 17)
        _eq(Dense(40).apply({"params": p}, x), jaxfp4.matmul(x, w))
    with pytest.raises(ValueError, match=r"weight must be an NVFP4Tensor \[N, K\] without batch axes"):
        dense_params(jaxfp4.quantize(jnp.ones((2, 8, 32))))
    with pytest.raises(TypeError, match=r"weight must be an NVFP4Tensor"):
        dense_params(jnp.ones((8, 32)))
    with pytest.raises(ValueError, match=r"input_scale must be a float32 scalar"):
        dense_params(w, input_scale=jnp.ones(2))


class _FloatMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, name="fc0")(x))      # in-dim 40: stays float
        x = nn.relu(nn.Dense(48, name="fc1")(x))
        x = nn.relu(nn.Dense(40, name="fc2")(x))
        return nn.Dense(20, name="head")(x)


class _QuantMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, name="fc0")(x))
        x = nn.relu(Dense(48, use_bias=True, dtype=jnp.float32, name="fc1")(x))
        x = nn.relu(Dense(40, use_bias=True, dtype=jnp.float32, name="fc2")(x))
        return nn.Dense(20, name="head")(x)


def test_quantize_params_mlp(rng):
    x = jnp.asarray(rng.standard_normal((7, 40)), jnp.float32)
    fparams = _FloatMLP().init(jax.random.key(0), x)
    keep_head = lambda path, kernel: path[-1] != "head"
    qparams = quantize_params(fparams, predicate=keep_head)
    p = qparams["params"]
    assert set(p["fc0"]) == set(p["head"]) == {"kernel", "bias"}  # in-dim 40 / rejected by predicate
    assert set(p["fc1"]) == {"weight", "weight_scale", "weight_scale_2", "bias"}
    got = jax.jit(_QuantMLP().apply)(qparams, x)
    want = _FloatMLP().apply(fparams, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.3  # median 0.14, max 0.21 over 100 seeds
    # exactly the layers' jaxfp4.matmul on the same quantized weights
    f = fparams["params"]
    h = nn.relu(x @ f["fc0"]["kernel"] + f["fc0"]["bias"])
    for name in ("fc1", "fc2"):
        w = jaxfp4.quantize(f[name]["kernel"].T, sf_layout="linear")
        h = nn.relu(jaxfp4.matmul(h, w, out_dtype=jnp.float32) + f[name]["bias"])
    _eq(got, jax.jit(lambda v: v @ f["head"]["kernel"] + f["head"]["bias"])(h))
    # packed params run Dense(weight_packing="sm90") to the same result
    packed = quantize_params(fparams, packing="sm90", predicate=keep_head)["params"]["fc1"]
    hidden = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    _eq(Dense(48, use_bias=True, weight_packing="sm90").apply({"params": packed}, hidden),
        Dense(48, use_bias=True).apply({"params": p["fc1"]}, hidden))
    with pytest.raises(ValueError, match=r"quantize_params: mode must be one of"):
        quantize_params(fparams, mode="int8")


def _apply(layer, params, x):
    return jax.jit(layer.apply)({"params": params}, x)


@pytest.mark.parametrize("make,x,exc,match", [
    (lambda: Dense(20, mode="w8a8"), jnp.ones((2, 48)), ValueError, r"Dense at .*: mode must be one of"),
    (lambda: Dense(20, dtype=jnp.int8), jnp.ones((2, 48)), TypeError, r"Dense at .*: dtype must be float32"),
    (lambda: Dense(20, out_dtype=jnp.int32), jnp.ones((2, 48)), TypeError,
     r"Dense at .*: out_dtype must be float32, bfloat16 or float16"),
    (lambda: Dense(20, weight_packing="sm100"), jnp.ones((2, 48)), ValueError, r"weight_packing must be one of"),
    (lambda: Dense(20), jnp.ones((2, 40)), ValueError, r"the last dim of x, K=40, must be a multiple of 16"),
    (lambda: Dense(20), jnp.ones((2, 32)), ValueError,
     r"the last dim of x \(K=32\) does not match the weight \(K=48"),
    (lambda: Dense(20), jnp.ones((2, 48), jnp.int32), TypeError, r"x must be a float32, bfloat16 or float16"),
    (lambda: Dense(24), jnp.ones((2, 48)), ValueError, r"param 'weight' must have shape \(24, 24\)"),
    (lambda: Dense(20, weight_packing="sm90"), jnp.ones((2, 48)), ValueError,
     r"param 'weight' must have shape \(2, 512\) \(sm90 packed\)"),
])
def test_errors_name_the_module(rng, make, x, exc, match):
    _, params = _params(rng, 20, 48)
    with pytest.raises(exc, match=match):
        _apply(make(), params["params"], x)


def test_errors_bad_params_in_a_named_submodule(rng):
    _, params = _params(rng, 20, 48)
    p = params["params"]

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Dense(20, name="proj")(x)

    x = jnp.ones((2, 48))
    bad = {"weight": p["weight"].astype(jnp.int8)}
    with pytest.raises(TypeError, match=r"Dense at 'proj': param 'weight' must be uint8"):
        _apply(Outer(), {"proj": {**p, **bad}}, x)
    with pytest.raises(TypeError, match=r"Dense at 'proj': param 'weight_scale' must be float8_e4m3fn"):
        _apply(Outer(), {"proj": {**p, "weight_scale": p["weight_scale"].astype(jnp.float32)}}, x)
    with pytest.raises(ValueError, match=r"Dense at 'proj': param 'weight_scale_2' must be a float32 scalar"):
        _apply(Outer(), {"proj": {**p, "weight_scale_2": jnp.ones(3)}}, x)


def test_lazy_submodule_attributes():
    import jaxfp4.flax as mod
    assert jaxfp4.flax is mod and "flax" in dir(jaxfp4)
    with pytest.raises(AttributeError, match=r"no attribute 'nope'"):
        jaxfp4.nope
