"""jaxfp4.matmul_chain (jaxfp4/chain.py, jaxfp4/primitives/gemm_chain.py) on any
backend: the chain against the same matmul calls made one by one, bit for bit;
its primitive, jit, vmap, errors; the Flax Dense's links. The CUDA kernel's
test is in test_gpu_fused.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfp4
from jaxfp4.primitives.gemm_chain import gemm_chain_p

from data import random_matrix


def _weights(rng, n, k, *, prepared=True):
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k), spread=2)), sf_layout="linear")
    return jaxfp4.prepare_weights(w) if prepared else w


def _act(rng, shape):
    return jnp.asarray(random_matrix(rng, shape, spread=3), jnp.bfloat16)


def _decoder_tail(rng, d=48, f=80, g_a=None):
    """A decoder layer after attention (o_proj, gate_up, down), as links, with its inputs.
    d, f: hidden and FFN widths (multiples of 16, not of 64)."""
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(d), jnp.bfloat16), 1e-5)
    w_o, w_gu, w_dn = _weights(rng, d, 32), _weights(rng, 2 * f, d), _weights(rng, d, f)
    s = {} if g_a is None else {"input_scale": jnp.float32(g_a)}

    def links(x):
        return [jaxfp4.Link(w_o, residual=x, **s), jaxfp4.Link(w_gu, prologue=norm, **s),
                jaxfp4.Link(w_dn, prologue=jaxfp4.SwiGLU(), residual=0, **s)]
    return links


def _one_by_one(a, links, out_dtype=jnp.bfloat16):
    outs, x = [], a
    for link in links:
        r = outs[link.residual] if isinstance(link.residual, int) else link.residual
        x = jaxfp4.matmul(x, link.weight, input_scale=link.input_scale, prologue=link.prologue, residual=r,
                          out_dtype=out_dtype)
        outs.append(x)
    return outs


def _chain_eqns(fn, *args):
    return [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive is gemm_chain_p]


@pytest.mark.parametrize("g_a", [None, 0.05], ids=["w4a16", "w4a4"])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_chain_is_the_matmuls_one_by_one(rng, m, g_a):
    links = _decoder_tail(rng, g_a=g_a)
    attn, x = _act(rng, (m, 32)), _act(rng, (m, 48))
    fn = jax.jit(lambda attn, x: jaxfp4.matmul_chain(attn, links(x)))
    got = fn(attn, x)
    want = jax.jit(lambda attn, x: _one_by_one(attn, links(x)))(attn, x)
    assert len(_chain_eqns(lambda attn, x: jaxfp4.matmul_chain(attn, links(x)), attn, x)) == 1
    assert [y.shape for y in got] == [(m, 48), (m, 160), (m, 48)]
    for y, w in zip(got, want):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(w, np.float32))
    assert np.isfinite(np.asarray(got[-1], np.float32)).all() and np.abs(np.asarray(got[-1], np.float32)).max() > 0


def test_chain_leading_axes_and_float32_out(rng):
    w1, w2 = _weights(rng, 48, 64), _weights(rng, 24, 48)  # link 1's K (48) is link 0's N
    a = _act(rng, (2, 3, 64))
    links = [jaxfp4.Link(w1), jaxfp4.Link(w2)]
    got = jaxfp4.matmul_chain(a, links, out_dtype=jnp.float32)
    # A float32 link input is not the fused op's bf16: the chain is then separate ops, still the same values.
    want = _one_by_one(a, links, jnp.float32)
    assert [y.shape for y in got] == [(2, 3, 48), (2, 3, 24)]
    for y, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(w))


def test_chain_falls_back_to_separate_ops(rng):
    """A pre-quantized a (W4A4 operand) is not a fused op: separate matmuls, no chain primitive."""
    w1, w2 = _weights(rng, 32, 48), _weights(rng, 16, 32)
    a = jaxfp4.quantize(_act(rng, (2, 48)), sf_layout="8x4")
    links = [jaxfp4.Link(w1), jaxfp4.Link(w2)]
    assert not _chain_eqns(lambda a: jaxfp4.matmul_chain(a, links), a)
    for y, w in zip(jaxfp4.matmul_chain(a, links), _one_by_one(a, links)):
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(w, np.float32))


def test_chain_vmap(rng):
    links = _decoder_tail(rng)
    attn, x = _act(rng, (3, 2, 32)), _act(rng, (3, 2, 48))
    got = jax.vmap(lambda attn, x: jaxfp4.matmul_chain(attn, links(x)))(attn, x)
    for e in range(3):
        want = _one_by_one(attn[e], links(x[e]))
        for y, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(y[e], np.float32), np.asarray(w, np.float32))


def test_chain_errors(rng):
    w1, w2 = _weights(rng, 32, 48), _weights(rng, 16, 32)
    a = _act(rng, (2, 48))
    with pytest.raises(TypeError, match="non-empty list of jaxfp4.Link"):
        jaxfp4.matmul_chain(a, [])
    with pytest.raises(TypeError, match=r"links\[1\] must be a jaxfp4.Link"):
        jaxfp4.matmul_chain(a, [jaxfp4.Link(w1), w2])
    with pytest.raises(TypeError, match=r"links\[0\].weight must be an NVFP4Tensor"):
        jaxfp4.matmul_chain(a, [jaxfp4.Link(a)])
    with pytest.raises(ValueError, match=r"links\[1\].residual: an int names an earlier link's output"):
        jaxfp4.matmul_chain(a, [jaxfp4.Link(w1), jaxfp4.Link(w2, residual=1)])
    with pytest.raises(ValueError, match=r"links\[1\]: a and b must share K"):
        jaxfp4.matmul_chain(a, [jaxfp4.Link(w1), jaxfp4.Link(w1)])
    with pytest.raises(ValueError, match=r"links\[1\]: residual must have the output's shape"):
        jaxfp4.matmul_chain(a, [jaxfp4.Link(w1), jaxfp4.Link(w2, residual=0)])


# ---- jaxfp4.flax.Dense.link -----------------------------------------------------------------

def test_dense_links_chain_like_their_calls(rng):
    """Two Dense layers as a chain (params made by .init through .link) give their calls' outputs."""
    nn = pytest.importorskip("flax.linen")
    import jaxfp4.flax as jfx

    class Two(nn.Module):
        chained: bool

        @nn.compact
        def __call__(self, x):
            d1, d2 = jfx.Dense(48, name="d1"), jfx.Dense(32, name="d2")
            norm = jaxfp4.RMSNorm(jnp.ones((48,), jnp.bfloat16), 1e-6)
            if self.chained:
                return jaxfp4.matmul_chain(x, [d1.link(32), d2.link(48, prologue=norm, residual=x)])[-1]
            return d2(d1(x), prologue=norm, residual=x)

    x = _act(rng, (2, 32))
    params = Two(True).init(jax.random.key(0), x)
    assert set(params["params"]) == {"d1", "d2"}
    got, want = Two(True).apply(params, x), Two(False).apply(params, x)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_dense_link_errors():
    import jaxfp4.flax as jfx
    pytest.importorskip("flax.linen")
    x = jnp.ones((1, 32), jnp.bfloat16)
    for dense, match in ((jfx.Dense(16, use_bias=True), "a chain link has no bias"),
                         (jfx.Dense(16, mode="w4a4"), "needs static_input_scale=True"),
                         (jfx.Dense(16), "in_features, K=40, must be a multiple of 16")):
        k = 40 if "K=40" in match else 32
        with pytest.raises(ValueError, match=match):
            dense.init(jax.random.key(0), x[:, :k] if k == 32 else jnp.ones((1, 40)), method=lambda m, x: m.link(k))


def test_chain_kernel_choice(rng):
    """The CUDA lowering: one jaxfp4_gemm_chain call where every link is one fused kernel
    (prepared weights, bf16, prologues at M = 1, at most MAX_LINKS links), else the links
    as separate ops; the CPU always runs the links one by one."""
    from jax.core import ShapedArray
    from jaxfp4.primitives import gemm_chain

    tail, square = _decoder_tail(rng), _weights(rng, 48, 48)

    def choice(m, platform="cuda", links=None):
        attn, x = _act(rng, (m, 32)), _act(rng, (m, 48))
        fn = (lambda attn, x: jaxfp4.matmul_chain(attn, tail(x))) if links is None else \
            (lambda attn, x: jaxfp4.matmul_chain(x, links))
        (eqn,) = _chain_eqns(fn, attn, x)
        avals = [ShapedArray(v.aval.shape, v.aval.dtype) for v in eqn.invars]
        return gemm_chain._choose(platform, avals, eqn.params)

    assert choice(1) is None  # native
    assert choice(2)[1] is gemm_chain._compose  # the RMSNorm prologue is fused at M = 1 only
    assert choice(1, "cpu")[1] is gemm_chain._compose
    assert choice(2, links=[jaxfp4.Link(square)] * 8) is None  # residual-only links: up to 32 rows
    assert gemm_chain.MAX_LINKS == 8 and choice(2, links=[jaxfp4.Link(square)] * 9)[1] is gemm_chain._compose
