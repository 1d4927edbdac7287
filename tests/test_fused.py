"""jaxfp4.matmul's prologue (RMSNorm, SwiGLU) and residual (jaxfp4/fused.py,
jaxfp4/primitives/fused_gemm.py) on any backend: the prologues against a
float64 oracle, the fused op against the same steps as separate ops, its
batching, its errors, and the Flax Dense and decode example that use it. The
CUDA kernel's own tests are in test_gpu_fused.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4.fused import add_residual
from jaxfp4.primitives.fused_gemm import PROLOGUE_MAX_M, fused_fits, fused_gemm_p

from data import random_matrix

BF16 = ml_dtypes.bfloat16


def _weights(rng, n, k, *, prepared=True, lead=()):
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (*lead, n, k), spread=2)), sf_layout="linear")
    return jaxfp4.prepare_weights(w) if prepared else w


def _act(rng, shape, dtype=jnp.bfloat16):
    """Activations (binades vary by 16-block) or, for a last dim not of 16s, a residual."""
    x = random_matrix(rng, shape, spread=3) if shape[-1] % 16 == 0 else rng.standard_normal(shape)
    return jnp.asarray(x, dtype)


def _norm_w(rng, k):
    return jnp.asarray(0.5 + rng.random(k), jnp.bfloat16)


def _fused_eqns(fn, *args):
    return [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive is fused_gemm_p]


# ---- the prologues: their definitions ------------------------------------------------------

def test_rms_norm_matches_float64(rng):
    x = random_matrix(rng, (5, 272), spread=4).astype(BF16)
    w = (0.5 + rng.random(272)).astype(BF16)
    got = np.asarray(jaxfp4.RMSNorm(jnp.asarray(w), 1e-5)(jnp.asarray(x)), np.float64)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want = x64 / np.sqrt(np.mean(x64 * x64, -1, keepdims=True) + 1e-5) * w64
    # float32 arithmetic, one rounding to bf16: within a bf16 ulp (2^-8 relative) of the exact value
    np.testing.assert_allclose(got, want, rtol=2.0 ** -8, atol=0)
    assert jaxfp4.RMSNorm(jnp.asarray(w), 1e-5)(jnp.asarray(x)).dtype == jnp.bfloat16


def test_swiglu_matches_float64(rng):
    x = random_matrix(rng, (3, 2 * 48), spread=2).astype(BF16)
    got = np.asarray(jaxfp4.SwiGLU()(jnp.asarray(x)), np.float64)
    g, u = np.split(x.astype(np.float64), 2, axis=-1)
    want = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(got, want, rtol=2.0 ** -8, atol=1e-30)
    assert got.shape == (3, 48)


def test_prologues_are_pytrees():
    norm = jaxfp4.RMSNorm(jnp.ones(16, jnp.bfloat16), 1e-3)
    leaves, tree = jax.tree_util.tree_flatten(norm)
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(back, jaxfp4.RMSNorm) and back.eps == 1e-3 and len(leaves) == 1
    assert jax.tree_util.tree_leaves(jaxfp4.SwiGLU()) == []
    # through jit as an argument
    y = jax.jit(lambda p, x: p(x))(norm, jnp.ones((2, 16), jnp.bfloat16))
    assert y.shape == (2, 16)


# ---- the fused op: the same values as the separate ops ------------------------------------

@pytest.mark.parametrize("m", [1, 7, 8, 9, 33])
@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "plain"])
def test_matmul_rms_norm_and_residual(rng, m, prepared):
    n, k = 200, 272  # N not a multiple of 16 tiles' 32 rows, K not of 64
    w = _weights(rng, n, k, prepared=prepared)
    x, nw, r = _act(rng, (m, k)), _norm_w(rng, k), _act(rng, (m, n))
    norm = jaxfp4.RMSNorm(nw, 1e-5)
    got = jax.jit(lambda x, r: jaxfp4.matmul(x, w, prologue=norm, residual=r))(x, r)
    # Under one jit too: XLA may keep the norm's output in float32 inside a fusion
    # (excess precision), so an eager composition can differ from a jitted one by an ulp.
    want = jax.jit(lambda x, r: add_residual(jaxfp4.matmul(norm(x), w), r))(x, r)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
    if jax.default_backend() == "cpu":  # the composition itself
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    else:
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2.0 ** -7, atol=2e-3 * float(np.abs(want.astype(np.float32)).max()))


def test_matmul_swiglu_leading_axes(rng):
    n, k = 40, 48
    w = _weights(rng, n, k)
    x = _act(rng, (2, 3, 2 * k))
    got = jaxfp4.matmul(x, w, prologue=jaxfp4.SwiGLU(), out_dtype=jnp.float32)
    want = jaxfp4.matmul(jaxfp4.SwiGLU()(x), w, out_dtype=jnp.float32)
    assert got.shape == (2, 3, n) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_matmul_residual_alone_and_other_modes(rng):
    """The residual with W4A16, W4A4 (an NVFP4Tensor a) and W4A4 from a static scale;
    the prologue with input_scale (separate ops: quantize the normed activations)."""
    n, k, m = 24, 64, 3
    w = _weights(rng, n, k)
    x, r = _act(rng, (m, k)), _act(rng, (m, n))
    for a, kw in ((x, {}), (jaxfp4.quantize(x, sf_layout="8x4"), {}), (x, {"input_scale": 0.01})):
        got = jaxfp4.matmul(a, w, residual=r, **kw)
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(add_residual(jaxfp4.matmul(a, w, **kw), r), np.float32))
    norm = jaxfp4.RMSNorm(_norm_w(rng, k), 1e-6)
    # Both under jit: the norm's sum of squares may be reduced in another order eagerly.
    got = jax.jit(lambda x: jaxfp4.matmul(x, w, prologue=norm, input_scale=0.01))(x)
    want = jax.jit(lambda x: jaxfp4.matmul(norm(x), w, input_scale=0.01))(x)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_fused_primitive_in_the_jaxpr(rng):
    """W4A16 with shared weights is one fused_gemm equation with its prologue as a
    param; batched weights or W4A4 are separate ops (no fused equation)."""
    n, k = 32, 64
    w = _weights(rng, n, k)
    x, nw, r = _act(rng, (4, k)), _norm_w(rng, k), _act(rng, (4, n))
    (e,) = _fused_eqns(lambda x, r: jaxfp4.matmul(x, w, prologue=jaxfp4.RMSNorm(nw, 1e-5), residual=r), x, r)
    assert e.params["prologue"] == "rms_norm" and e.params["eps"] == 1e-5 and e.params["b_packing"] == "sm90"
    (e,) = _fused_eqns(lambda x: jaxfp4.matmul(x, w, prologue=jaxfp4.SwiGLU()), _act(rng, (4, 2 * k)))
    assert e.params["prologue"] == "swiglu" and e.invars[-1].aval.shape == (0,)  # no residual
    (e,) = _fused_eqns(lambda x: jaxfp4.matmul(x, w, prologue=jaxfp4.SwiGLU(), input_scale=0.1),
                       _act(rng, (4, 2 * k)))
    assert e.params["quantize_a"] and e.invars[2].aval.shape == ()  # W4A4: a_g
    wb = _weights(rng, n, k, lead=(2,))
    assert not _fused_eqns(lambda x, r: jaxfp4.matmul(x, wb, residual=r), x, jnp.stack([r, r]))
    assert not _fused_eqns(lambda x, r: jaxfp4.matmul(jaxfp4.quantize(x), w, residual=r), x, r)
    assert not _fused_eqns(lambda x: jaxfp4.matmul(x, w, prologue=jaxfp4.SwiGLU(), input_scale=jnp.ones(3)),
                           _act(rng, (3, 4, 2 * k)))  # one scale per batch entry


def test_fused_fits_rule():
    bf, f32 = jnp.bfloat16, jnp.float32
    p = PROLOGUE_MAX_M
    assert fused_fits(p, 4096, "rms_norm", bf, bf, bf, True, "sm90")
    assert not fused_fits(p + 1, 4096, "rms_norm", bf, bf, bf, True, "sm90")  # M > PROLOGUE_MAX_M
    assert not fused_fits(1, 4096, "rms_norm", bf, bf, bf, True, None)        # plain weights
    assert not fused_fits(1, 4096, "rms_norm", bf, f32, bf, False, "sm90")    # float32 norm weight
    assert not fused_fits(1, 4096, "rms_norm", bf, bf, f32, True, "sm90")     # residual needs bf16 out
    assert fused_fits(1, 4096, "rms_norm", bf, bf, f32, False, "sm90")        # float32 logits
    assert fused_fits(1, 14336, "swiglu", bf, bf, bf, True, "sm90")           # a row of 28.7 KB
    assert fused_fits(3, 14336, "none", bf, bf, bf, True, "sm90", quantize_a=False)
    assert fused_fits(32, 4096, "none", bf, bf, bf, True, None)               # the residual alone
    assert not fused_fits(33, 4096, "none", bf, bf, bf, True, "sm90")
    assert fused_fits(8, 4096, "none", bf, bf, bf, True, "sm90", quantize_a=True)   # W4A4: staged rows
    assert not fused_fits(8, 4096, "swiglu", bf, bf, bf, True, "sm90", quantize_a=True)
    assert not fused_fits(9, 4096, "none", bf, bf, bf, True, "sm90", quantize_a=True)
    assert fused_fits(1, 14336, "swiglu", bf, bf, bf, True, "sm90", quantize_a=True)
    assert fused_fits(2, 14336, "none", bf, bf, bf, True, "sm90", quantize_a=True)      # 2 rows fit 80 KB
    assert not fused_fits(3, 14336, "none", bf, bf, bf, True, "sm90", quantize_a=True)  # 3 do not


@pytest.mark.parametrize("m,prologue", [(9, "rms_norm"), (16, "none"), (32, "swiglu")])
def test_w4a4_residual_at_decoded_rows(rng, m, prologue):
    """W4A4 + residual at rows the fused kernel cannot quantize itself on the GPU
    (fused_gemm._quantized_then_fused: quantize and decode, then the W4A16 kernel
    storing the residual, in one call), as the primitives it equals
    (quantized_then_fused_ops) through the CPU handlers: the same bits as the
    separate ops; and the CUDA lowering's choice."""
    from jax.core import ShapedArray
    from jaxfp4.primitives import fused_gemm
    from jaxfp4.primitives.quantize import quantize_decoded_p

    def quantized_then_fused_ops(a, norm_weight, a_g, b_data, b_scales, b_g, residual, *, prologue, eps,
                                 epilogue, quantize_a, a_sf_layout, **params):
        """What the route's one call computes, as primitives: quantize_decoded, then
        the fused W4A16 op with g_a * g_b storing the residual."""
        x = fused_gemm.apply_prologue(a, norm_weight, prologue, eps)
        xq, g = quantize_decoded_p.bind(x, a_g, b_g.reshape(a_g.shape))
        return fused_gemm_p.bind(xq, jnp.zeros((0,), jnp.bfloat16), jnp.zeros((0,), jnp.float32), b_data,
                                 b_scales, g, residual, prologue="none", eps=0.0, epilogue="none", quantize_a=False,
                                 a_sf_layout=None, **params)

    n, k = 37, 272
    k_in = 2 * k if prologue == "swiglu" else k
    a = jnp.asarray(_act(rng, (m, k_in)))
    norm_w = jnp.asarray(1 + 0.1 * rng.standard_normal(k), jnp.bfloat16) if prologue == "rms_norm" \
        else jnp.zeros((0,), jnp.bfloat16)
    w = _weights(rng, n, k)
    r = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    g_a = jnp.float32(0.05)
    params = dict(prologue=prologue, eps=1e-5, epilogue="none", quantize_a=True, a_sf_layout="8x4",
                  b_sf_layout=w.sf_layout,
                  b_packing=w.packing, b_shape=(n, k), out_dtype=jnp.bfloat16)
    args = (a, norm_w, g_a, w.data, w.scales, w.global_scale, r)
    (got,) = quantized_then_fused_ops(*args, **params)
    (want,) = fused_gemm._compose(*args, **params)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    avals = [ShapedArray(x.shape, x.dtype) for x in args]
    assert fused_gemm._choose("cuda", avals, params)[1] is fused_gemm._quantized_then_fused
    small = [ShapedArray((8, k_in), a.dtype), *avals[1:6], ShapedArray((8, n), r.dtype)]
    choice = fused_gemm._choose("cuda", small, params)  # 8 rows: the in-kernel quantization where they fit
    assert choice is None or choice[1] is not fused_gemm._quantized_then_fused
    assert fused_gemm._choose("cpu", avals, params)[1] is fused_gemm._compose


# ---- batching -------------------------------------------------------------------------------

def test_vmap_folds_rows_and_maps_weights(rng):
    n, k = 40, 48
    w = _weights(rng, n, k)
    nw = _norm_w(rng, k)
    x, r = _act(rng, (3, 2, k)), _act(rng, (3, 2, n))
    f = lambda x, r, nw: jaxfp4.matmul(x, w, prologue=jaxfp4.RMSNorm(nw, 1e-5), residual=r)
    got = jax.vmap(f, in_axes=(0, 0, None))(x, r, nw)
    want = jnp.stack([f(x[i], r[i], nw) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # the activations mapped, the residual not (broadcast); then a mapped norm weight
    got = jax.vmap(f, in_axes=(0, None, None))(x, r[0], nw)
    np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(f(x[2], r[0], nw), np.float32))
    nws = jnp.stack([nw, 2 * nw, nw / 2]).astype(jnp.bfloat16)
    got = jax.vmap(f)(x, r, nws)
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(f(x[1], r[1], nws[1]), np.float32))


# ---- errors, named at trace time ---------------------------------------------------------------

def test_errors(rng):
    n, k = 24, 64
    w = _weights(rng, n, k)
    x = _act(rng, (2, k))
    with pytest.raises(TypeError, match=r"prologue must be jaxfp4.RMSNorm\(weight, eps\), jaxfp4.SwiGLU\(\)"):
        jaxfp4.matmul(x, w, prologue="rms_norm")
    with pytest.raises(ValueError, match=r"a must have last dim 128 for b of K=64 \(\[gate \| up\]: 2K\)"):
        jaxfp4.matmul(x, w, prologue=jaxfp4.SwiGLU())
    with pytest.raises(ValueError, match=r"RMSNorm.weight must have shape \(64,\)"):
        jaxfp4.matmul(x, w, prologue=jaxfp4.RMSNorm(jnp.ones(32, jnp.bfloat16)))
    with pytest.raises(TypeError, match=r"RMSNorm.weight.dtype must be float32, bfloat16 or float16"):
        jaxfp4.matmul(x, w, prologue=jaxfp4.RMSNorm(jnp.ones(64, jnp.int32)))
    with pytest.raises(TypeError, match=r"a prologue transforms float activations"):
        jaxfp4.matmul(jaxfp4.quantize(x), w, prologue=jaxfp4.SwiGLU())
    with pytest.raises(TypeError, match=r"residual must have out_dtype float32, got bfloat16"):
        jaxfp4.matmul(x, w, residual=_act(rng, (2, n)), out_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 24\), got \(2, 23\)"):
        jaxfp4.matmul(x, w, residual=_act(rng, (2, 23)))
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 24\)"):
        jax.jit(lambda x: jaxfp4.matmul(x, w, residual=jnp.zeros((1, 24), jnp.bfloat16)))(x)


# ---- Flax ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,bias,static", [("w4a16", False, False), ("w4a16", True, False),
                                              ("w4a4", False, False), ("w4a4", False, True)])
def test_dense_prologue_and_residual(rng, mode, bias, static):
    """Dense(x, prologue=, residual=) is residual + Dense(prologue(x)) (the residual after the
    bias); W4A16 or static-scale W4A4 without a bias is one fused equation."""
    from jaxfp4.flax import Dense
    k, n = 64, 40
    layer = Dense(n, mode=mode, use_bias=bias, weight_packing="sm90", static_input_scale=static)
    x, r, nw = _act(rng, (2, 3, k)), _act(rng, (2, 3, n)), _norm_w(rng, k)
    params = layer.init(jax.random.key(0), x)
    if bias:
        params = jax.tree.map(lambda v: v, params)
        params["params"]["bias"] = _act(rng, (n,))
    norm = jaxfp4.RMSNorm(nw, 1e-5)
    # op by op: under jit XLA may keep the bias sum in float32 before the add (excess precision)
    got = layer.apply(params, x, prologue=norm, residual=r)
    want = layer.apply(params, norm(x)) + r
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    fused = _fused_eqns(lambda p, x, r: layer.apply(p, x, prologue=norm, residual=r), params, x, r)
    assert len(fused) == (1 if (mode == "w4a16" or static) and not bias else 0)
    x2 = _act(rng, (2, 3, 2 * k))  # SwiGLU: [gate | up], the layer's K from half of it
    got = layer.apply(params, x2, prologue=jaxfp4.SwiGLU())
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(layer.apply(params, jaxfp4.SwiGLU()(x2)), np.float32))


def test_dense_errors_name_the_layer(rng):
    from jaxfp4.flax import Dense
    layer = Dense(40, name="o_proj")
    x = _act(rng, (2, 64))
    params = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"Dense at 'o_proj'.*residual must be bfloat16 \(2, 40\)"):
        layer.apply(params, x, residual=jnp.zeros((2, 40), jnp.float32))
    with pytest.raises(TypeError, match=r"Dense at 'o_proj'.*prologue must be jaxfp4.RMSNorm"):
        layer.apply(params, x, prologue=lambda v: v)
    # SwiGLU takes [gate | up]: x of 2K = 96 is K = 48, not the weight's 64
    with pytest.raises(ValueError, match=r"Dense at 'o_proj': the last dim of x \(K=48\) does not match the weight \(K=64"):
        layer.apply(params, _act(rng, (2, 96)), prologue=jaxfp4.SwiGLU())


def test_dense_prologue_under_remat_and_scan(rng):
    """The prologue (a pytree) and residual pass through nn.remat and nn.scan (stacked layers)."""
    import flax.linen as nn
    from jaxfp4.flax import Dense
    k = 64

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            norm = jaxfp4.RMSNorm(self.param("norm", nn.initializers.ones, (k,), jnp.bfloat16), 1e-5)
            return Dense(k, weight_packing="sm90", name="proj")(x, prologue=norm, residual=x), None

    x = _act(rng, (2, 3, k))
    for cls in (nn.remat(Block), nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                                         length=3)):
        model = cls()
        params = model.init(jax.random.key(0), x, None)
        got, _ = jax.jit(model.apply)(params, x, None)
        assert got.shape == x.shape and got.dtype == jnp.bfloat16
        # the same as the block written out, layer by layer
        p = params["params"]
        layers = [jax.tree.map(lambda v, i=i: v[i], p) for i in range(3)] if "norm" in p and p["norm"].ndim == 2 \
            else [p]
        want = x
        for lp in layers:
            dense = {"params": lp["proj"]}
            want = Dense(k, weight_packing="sm90").apply(dense, jaxfp4.RMSNorm(lp["norm"], 1e-5)(want)) + want
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=0, atol=0.02 * float(np.abs(np.asarray(want, np.float32)).max()))
