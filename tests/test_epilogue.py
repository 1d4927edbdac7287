"""jaxfp4.matmul's epilogue (jaxfp4.InterleavedSwiGLU) and jaxfp4.interleave_gate_up
on any backend: the interleaving against numpy, the epilogue against the GEMM
followed by the SwiGLU of its de-interleaved columns, in jit, vmap and
matmul_chain, and its errors. The CUDA store's own tests are in
test_gpu_epilogue.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4.fused import GATE_UP_BLOCK
from jaxfp4.primitives import fused_gemm
from jaxfp4.primitives.fused_gemm import fused_gemm_p

from data import random_matrix


def _gate_up(rng, n_gate, k, *, prepared=False):
    """gate and up [n_gate, K] quantized together (one global scale), and their interleaving."""
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (2 * n_gate, k), spread=2)), sf_layout="linear")
    gate, up = (jaxfp4.NVFP4Tensor(w.data[s], w.scales[s], w.global_scale, "linear")
                for s in (slice(0, n_gate), slice(n_gate, None)))
    wi = jaxfp4.interleave_gate_up(gate, up)
    return gate, up, (jaxfp4.prepare_weights(wi) if prepared else wi)


def _act(rng, shape):
    return jnp.asarray(random_matrix(rng, shape, spread=3), jnp.bfloat16)


def _swiglu_of_halves(gate_out, up_out):
    """SwiGLU of separately computed gate and up products (the unfused model)."""
    return jaxfp4.SwiGLU()(jnp.concatenate([gate_out, up_out], axis=-1))


def test_interleave_arrays_and_tensors(rng):
    g, u = (rng.standard_normal((24, 8)).astype(np.float32) for _ in range(2))
    got = np.asarray(jaxfp4.interleave_gate_up(g, u))
    want = np.concatenate([np.stack([g[i:i + 8], u[i:i + 8]]).reshape(16, 8) for i in range(0, 24, 8)])
    np.testing.assert_array_equal(got, want)
    # a flax kernel [K, N]: along the last axis
    np.testing.assert_array_equal(np.asarray(jaxfp4.interleave_gate_up(g.T, u.T, axis=-1)), want.T)
    for layout in ("linear", "128x4"):
        w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (48, 64), spread=2)), sf_layout=layout)
        gate, up = (jaxfp4.quantize(jaxfp4.dequantize(w)[s], w.global_scale, sf_layout=layout)
                    for s in (slice(0, 24), slice(24, None)))
        wi = jaxfp4.interleave_gate_up(gate, up)
        assert wi.sf_layout == layout and wi.shape == (48, 64)
        want = jaxfp4.interleave_gate_up(jaxfp4.dequantize(gate), jaxfp4.dequantize(up))
        np.testing.assert_array_equal(np.asarray(jaxfp4.dequantize(wi)), np.asarray(want))


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("prepared", [False, True], ids=["plain", "prepared"])
def test_epilogue_is_swiglu_of_the_halves(rng, m, prepared):
    """matmul(x, interleave_gate_up(gate, up), epilogue=...) == SwiGLU of x @ gate, x @ up,
    bit for bit (the same bf16 products, then the same float32 SwiGLU), N_gate not a power
    of two, K = 272."""
    gate, up, wi = _gate_up(rng, 40, 272, prepared=prepared)
    x = _act(rng, (m, 272))
    got = jax.jit(lambda x: jaxfp4.matmul(x, wi, epilogue=jaxfp4.InterleavedSwiGLU()))(x)
    want = _swiglu_of_halves(jaxfp4.matmul(x, gate), jaxfp4.matmul(x, up))
    assert got.shape == (m, 40) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_epilogue_with_prologue_leading_axes_and_float32(rng):
    gate, up, wi = _gate_up(rng, 24, 64, prepared=True)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(64), jnp.bfloat16), 1e-5)
    x = _act(rng, (2, 3, 64))
    got = jaxfp4.matmul(x, wi, prologue=norm, epilogue=jaxfp4.InterleavedSwiGLU(), out_dtype=jnp.float32)
    nx = norm(x)
    want = _swiglu_of_halves(jaxfp4.matmul(nx, gate, out_dtype=jnp.float32),
                             jaxfp4.matmul(nx, up, out_dtype=jnp.float32))
    assert got.shape == (2, 3, 24) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_epilogue_is_a_primitive_param_and_vmaps(rng):
    _, _, wi = _gate_up(rng, 16, 32, prepared=True)
    x = _act(rng, (4, 2, 32))
    fn = lambda x: jaxfp4.matmul(x, wi, epilogue=jaxfp4.InterleavedSwiGLU())  # noqa: E731
    (eqn,) = [e for e in jax.make_jaxpr(fn)(x[0]).jaxpr.eqns if e.primitive is fused_gemm_p]
    assert eqn.params["epilogue"] == "swiglu_interleaved" and eqn.outvars[0].aval.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(jax.vmap(fn)(x), np.float32), np.asarray(fn(x), np.float32))


def test_epilogue_w4a4(rng):
    """With input_scale the activations are quantized first, then the same epilogue."""
    gate, up, wi = _gate_up(rng, 16, 64, prepared=True)
    x, g_a = _act(rng, (3, 64)), jnp.float32(0.01)
    got = jaxfp4.matmul(x, wi, input_scale=g_a, epilogue=jaxfp4.InterleavedSwiGLU())
    want = _swiglu_of_halves(jaxfp4.matmul(x, gate, input_scale=g_a), jaxfp4.matmul(x, up, input_scale=g_a))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_chain_with_epilogue(rng):
    """gate_up (RMSNorm prologue, SwiGLU epilogue) then down with a residual: the chain's
    outputs are its links' own calls."""
    _, _, wi = _gate_up(rng, 80, 48, prepared=True)
    w_down = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (48, 80), spread=2)),
                                                    sf_layout="linear"))
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(48), jnp.bfloat16), 1e-5)
    x = _act(rng, (1, 48))
    links = [jaxfp4.Link(wi, prologue=norm, epilogue=jaxfp4.InterleavedSwiGLU()), jaxfp4.Link(w_down, residual=x)]
    act, y = jax.jit(lambda x: jaxfp4.matmul_chain(x, links))(x)
    want_act = jaxfp4.matmul(x, wi, prologue=norm, epilogue=jaxfp4.InterleavedSwiGLU())
    assert act.shape == (1, 80) and y.shape == (1, 48)
    np.testing.assert_array_equal(np.asarray(act, np.float32), np.asarray(want_act, np.float32))
    want_y = jaxfp4.matmul(want_act, w_down, residual=x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want_y, np.float32))


def test_kernel_choice(rng):
    """On CUDA the epilogue is native for bf16 out, prepared weights, M <= 32, no residual;
    with a prologue the kernel cannot take (M > 1), the prologue runs in jnp and the epilogue
    stays in the kernel."""
    from jax.core import ShapedArray

    fits = lambda m, out=jnp.bfloat16, res=False, packing="sm90": fused_gemm.fused_fits(  # noqa: E731
        m, 64, "none", jnp.bfloat16, jnp.bfloat16, out, res, packing, epilogue="swiglu_interleaved")
    assert fits(1) and fits(32)
    assert not fits(33) and not fits(1, out=jnp.float32) and not fits(1, res=True) and not fits(1, packing=None)
    _, _, wi = _gate_up(rng, 16, 64, prepared=True)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(64), jnp.bfloat16), 1e-5)

    def choice(m):
        fn = lambda x: jaxfp4.matmul(x, wi, prologue=norm, epilogue=jaxfp4.InterleavedSwiGLU())  # noqa: E731
        (eqn,) = [e for e in jax.make_jaxpr(fn)(_act(rng, (m, 64))).jaxpr.eqns if e.primitive is fused_gemm_p]
        return fused_gemm._choose("cuda", [ShapedArray(v.aval.shape, v.aval.dtype) for v in eqn.invars], eqn.params)

    assert choice(1) is None
    assert choice(16)[1] is fused_gemm._prologue_then_fused
    assert choice(33)[1] is fused_gemm._compose


def test_errors(rng):
    _, _, wi = _gate_up(rng, 16, 32)
    x = _act(rng, (2, 32))
    ep = jaxfp4.InterleavedSwiGLU()
    with pytest.raises(ValueError, match="epilogue and residual together"):
        jaxfp4.matmul(x, wi, epilogue=ep, residual=jnp.zeros((2, 16), jnp.bfloat16))
    with pytest.raises(TypeError, match="epilogue must be jaxfp4.InterleavedSwiGLU"):
        jaxfp4.matmul(x, wi, epilogue=jaxfp4.SwiGLU())
    odd = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (24, 32), spread=2)))
    with pytest.raises(ValueError, match="N % 16 == 0"):
        jaxfp4.matmul(x, odd, epilogue=ep)
    g = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (12, 32), spread=2)))
    with pytest.raises(ValueError, match=f"multiple of {GATE_UP_BLOCK} rows"):
        jaxfp4.interleave_gate_up(g, g)
    a = jaxfp4.quantize(jnp.ones((16, 32)))
    with pytest.raises(ValueError, match="share their global scale"):
        jaxfp4.interleave_gate_up(a, jaxfp4.quantize(2 * jnp.ones((16, 32))))
    with pytest.raises(ValueError, match="equal shapes"):
        jaxfp4.interleave_gate_up(a, jaxfp4.quantize(jnp.ones((8, 32))))
    with pytest.raises(ValueError, match="pass plain weights"):
        jaxfp4.interleave_gate_up(jaxfp4.prepare_weights(a), a)


def test_flax_dense_epilogue(rng):
    """jaxfp4.flax.Dense(x, epilogue=...) and .link(epilogue=...): the layer's output
    [..., features / 2]; with a bias (which would come before the SwiGLU) an error naming
    the layer."""
    import jaxfp4.flax as jfx

    _, _, wi = _gate_up(rng, 16, 64)
    x = _act(rng, (2, 64))
    dense = jfx.Dense(32)
    params = {"params": jfx.dense_params(wi)}
    got = dense.apply(params, x, epilogue=jaxfp4.InterleavedSwiGLU())
    want = jaxfp4.matmul(x, wi, epilogue=jaxfp4.InterleavedSwiGLU())
    assert got.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    link = dense.apply(params, 64, epilogue=jaxfp4.InterleavedSwiGLU(), method=jfx.Dense.link)
    assert isinstance(link.epilogue, jaxfp4.InterleavedSwiGLU)
    with pytest.raises(ValueError, match="Dense at .*an epilogue needs use_bias=False"):
        jfx.Dense(32, use_bias=True).init(jax.random.key(0), x, epilogue=jaxfp4.InterleavedSwiGLU())
    with pytest.raises(TypeError, match="Dense at .*epilogue must be jaxfp4.InterleavedSwiGLU"):
        dense.apply(params, x, epilogue=jaxfp4.SwiGLU())
