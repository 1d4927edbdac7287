"""jaxfp4.matmul's RotaryKVCache epilogue and jaxfp4.interleave_rotary on any backend:
the interleaving against a numpy permutation, the epilogue against numpy (the plain
GEMM, HF's half-split RoPE, the cache rows written), in jit, vmap, matmul_chain, W4A4
and flax, and its errors. Ragged sizes: 3 query heads, 1 kv head, head_dim 32 or 48."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
import jaxfp4.flax as jfx
from jaxfp4.primitives import gemm_chain
from jaxfp4.primitives.gemm_chain import gemm_chain_p

from data import random_matrix

HEADS, KV_HEADS = 3, 1


def _perm(n, head_dim):
    """Row i of the interleaved weight is row perm[i] of the plain one: per head, dims
    0-7, half+0..half+7, 8-15, half+8..half+15, ..."""
    half = head_dim // 2
    within = [d for j in range(0, half, 8) for d in (*range(j, j + 8), *range(half + j, half + j + 8))]
    return np.concatenate([h * head_dim + np.array(within) for h in range(n // head_dim)])


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _qkv(rng, d, k):
    """A plain qkv weight [(heads + 2 kv_heads) * d, k] and its rotary interleaving."""
    n = (HEADS + 2 * KV_HEADS) * d
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k), spread=2)), sf_layout="linear")
    return w, jaxfp4.interleave_rotary(w, d)


def _state(rng, b, s, t, d, *, batched_pos=True, batched_cos=True, dtype=jnp.bfloat16):
    """(cos, sin, positions, k_cache, v_cache): distinct positions per batch row, random caches."""
    pos = np.stack([rng.choice(t, s, replace=False) for _ in range(b)]).astype(np.int32)
    pos = pos if batched_pos else pos[0]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    cos, sin = jaxfp4.rope_tables(pos if batched_cos else pos.reshape(-1, s)[0], inv_freq)
    kc, vc = (jnp.asarray(rng.standard_normal((b, t, KV_HEADS, d)), dtype) for _ in range(2))
    return cos, sin, jnp.asarray(pos), kc, vc


def _oracle(y, cos, sin, pos, kc, vc):
    """numpy: (q, k_cache, v_cache) float32 from the plain-order GEMM output y [B*S, N]."""
    b, t, kvh, d = kc.shape
    s, half = pos.shape[-1], d // 2
    h = np.asarray(y, np.float32).reshape(b * s, HEADS + 2 * kvh, d)
    c, sn = (np.broadcast_to(np.asarray(z), (b, s, half)).reshape(b * s, 1, half) for z in (cos, sin))
    x1, x2 = h[..., :half], h[..., half:]
    rot = _bf16(np.concatenate([x1 * c - x2 * sn, x2 * c + x1 * sn], -1))
    k_want, v_want = np.array(kc, np.float32), np.array(vc, np.float32)
    pos = np.broadcast_to(np.asarray(pos), (b, s))
    for r, (bi, si) in enumerate(np.ndindex(b, s)):  # token rows in row-major (b, s) order
        p = pos[bi, si]
        if 0 <= p < t:
            k_want[bi, p], v_want[bi, p] = rot[r, HEADS:HEADS + kvh], h[r, HEADS + kvh:]
    return rot[:, :HEADS].reshape(b * s, -1), k_want, v_want


def _norm(rng, k):
    return jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(k), jnp.bfloat16), 1e-5)


def _same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _assert_rounded_close(got, want, frac=0.02):
    """Equal, or (a few values: mul+sub contracted to an FMA) one bf16 ulp apart."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-30))) - 7)
    off = got != want
    assert np.all(np.abs(got - want) <= ulp), np.max(np.abs(got - want) / ulp)
    assert off.mean() <= frac, off.mean()


def _assert_result(out, x, w, cos, sin, pos, kc, vc, lead):
    q, k_got, v_got = out
    b, _, _, d = kc.shape
    q_want, k_want, v_want = _oracle(jaxfp4.matmul(x.reshape(-1, x.shape[-1]), w), cos, sin, pos, kc, vc)
    assert q.shape == (*lead, HEADS * d) and q.dtype == jnp.bfloat16
    assert k_got.shape == kc.shape and v_got.dtype == vc.dtype
    _assert_rounded_close(q.reshape(-1, HEADS * d), q_want)
    _assert_rounded_close(k_got, k_want)
    np.testing.assert_array_equal(np.asarray(v_got, np.float32), v_want)  # values are stored, not computed


@pytest.mark.parametrize("d", [32, 48])
def test_interleave_rotary_arrays(rng, d):
    """Float arrays: rows (axis=-2) or a flax kernel's columns (axis=-1) permuted per head."""
    n = (HEADS + 2 * KV_HEADS) * d
    w = rng.standard_normal((2, n, 5)).astype(np.float32)
    p = _perm(n, d)
    assert sorted(p) == list(range(n))
    np.testing.assert_array_equal(np.asarray(jaxfp4.interleave_rotary(w, d)), w[:, p])
    kernel = w[0].T
    np.testing.assert_array_equal(np.asarray(jaxfp4.interleave_rotary(kernel, d, axis=-1)), kernel[:, p])


@pytest.mark.parametrize("layout", ["linear", "128x4", "8x4"])
def test_interleave_rotary_tensor_is_exact(rng, layout):
    """An NVFP4Tensor's codes and scales move with their rows: dequantize commutes with it."""
    t = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (5 * 48, 80), spread=3)), sf_layout=layout)
    ti = jaxfp4.interleave_rotary(t, 48)
    assert ti.sf_layout == layout and ti.shape == t.shape
    got, plain = np.asarray(jaxfp4.dequantize(ti)), np.asarray(jaxfp4.dequantize(t))
    np.testing.assert_array_equal(got, np.asarray(jaxfp4.interleave_rotary(jnp.asarray(plain), 48)))
    np.testing.assert_array_equal(got, plain[_perm(5 * 48, 48)])


def test_interleave_rotary_errors(rng):
    t = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (96, 32), spread=2)))
    with pytest.raises(ValueError, match="head_dim % 16 == 0 .*got head_dim=24, N=96"):
        jaxfp4.interleave_rotary(t, 24)
    with pytest.raises(ValueError, match="N % head_dim == 0, got head_dim=64, N=96"):
        jaxfp4.interleave_rotary(t, 64)
    with pytest.raises(ValueError, match="got head_dim=32, N=40"):
        jaxfp4.interleave_rotary(np.ones((3, 40), np.float32), 32, axis=-1)
    with pytest.raises(ValueError, match="pass plain weights"):
        jaxfp4.interleave_rotary(jaxfp4.prepare_weights(t), 32)


CASES = [  # b, s, d, k, t, batched positions, batched cos, x flattened, prepared
    (1, 1, 32, 48, 5, False, False, False, True),
    (2, 1, 48, 80, 9, True, True, False, True),
    (3, 2, 32, 80, 7, True, False, True, True),
    (2, 2, 48, 48, 6, False, True, True, False),
    (3, 1, 32, 48, 8, True, True, False, False),
]


@pytest.mark.parametrize("b,s,d,k,t,bpos,bcos,flat,prepared", CASES)
def test_epilogue_matches_numpy(rng, b, s, d, k, t, bpos, bcos, flat, prepared):
    """q is the rotated query heads of the plain GEMM's bf16 output; each token's rotated
    keys and raw values land at (b, positions[b, s]); every other cache row is unchanged."""
    w, wi = _qkv(rng, d, k)
    wi = jaxfp4.prepare_weights(wi) if prepared else wi
    cos, sin, pos, kc, vc = _state(rng, b, s, t, d, batched_pos=bpos, batched_cos=bcos)
    x = jnp.asarray(random_matrix(rng, (b * s, k) if flat else (b, s, k), spread=3), jnp.bfloat16)
    out = jaxfp4.matmul(x, wi, epilogue=jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS))
    _assert_result(out, x, w, cos, sin, pos, kc, vc, x.shape[:-1])


def test_out_of_range_positions_write_nothing(rng):
    """Positions < 0 or >= T drop the token's k and v; its q is still returned."""
    w, wi = _qkv(rng, 32, 48)
    cos, sin, _, kc, vc = _state(rng, 3, 2, 6, 32)
    pos = jnp.asarray([[-1, 6], [2, 100], [-7, 5]], jnp.int32)
    x = jnp.asarray(random_matrix(rng, (3, 2, 48), spread=3), jnp.bfloat16)
    ep = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS)
    out = jaxfp4.matmul(x, jaxfp4.prepare_weights(wi), epilogue=ep)
    _assert_result(out, x, w, cos, sin, pos, kc, vc, (3, 2))
    for c_got, c in zip(out[1:], (kc, vc)):  # only (1, 2) and (2, 5) written: no wrap-around of -1 or -7
        changed = np.any(np.asarray(c_got, np.float32) != np.asarray(c, np.float32), axis=(2, 3))
        np.testing.assert_array_equal(np.argwhere(changed), [[1, 2], [2, 5]])


def test_jit_donated_and_vmap(rng):
    """jit with donated caches and vmap over x and the caches give eager's results."""
    _, wi = _qkv(rng, 48, 80)
    wi = jaxfp4.prepare_weights(wi)
    cos, sin, pos, kc, vc = _state(rng, 2, 1, 7, 48)
    x = jnp.asarray(random_matrix(rng, (2, 1, 80), spread=3), jnp.bfloat16)
    step = lambda x, kc, vc, cos, sin, pos: jaxfp4.matmul(  # noqa: E731
        x, wi, epilogue=jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS))
    want = step(x, kc, vc, cos, sin, pos)
    ep = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS)  # a pytree: an argument of jit
    _same(jax.jit(lambda x, ep: jaxfp4.matmul(x, wi, epilogue=ep))(x, ep), want)
    _same(jax.jit(step, donate_argnums=(1, 2))(x, jnp.array(kc), jnp.array(vc), cos, sin, pos), want)
    cos2, sin2, pos2, kc2, vc2 = _state(rng, 2, 1, 7, 48)
    x2 = jnp.asarray(random_matrix(rng, (2, 1, 80), spread=3), jnp.bfloat16)
    stack = lambda *z: jnp.stack(z)  # noqa: E731
    got = jax.vmap(step, in_axes=(0, 0, 0, None, None, None))(stack(x, x2), stack(kc, kc2), stack(vc, vc2),
                                                               cos, sin, pos)
    _same(jax.tree.map(lambda g: g[0], got), want)
    _same(jax.tree.map(lambda g: g[1], got), step(x2, kc2, vc2, cos, sin, pos))
    got = jax.vmap(step)(stack(x, x2), stack(kc, kc2), stack(vc, vc2), stack(cos, cos2), stack(sin, sin2),
                         stack(pos, pos2))  # per-entry positions too
    _same(jax.tree.map(lambda g: g[1], got), step(x2, kc2, vc2, cos2, sin2, pos2))


def test_chain_rotary_link_after_o_proj(rng):
    """[o_proj, qkv (RMSNorm, RotaryKVCache)]: the rotary link's (q, k_cache, v_cache) are
    the separate matmul calls'."""
    _, wi = _qkv(rng, 32, 80)
    wi = jaxfp4.prepare_weights(wi)
    w_o = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (80, 48), spread=2))))
    cos, sin, pos, kc, vc = _state(rng, 2, 2, 8, 32, batched_pos=False)
    ep, norm = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS), _norm(rng, 80)
    x = jnp.asarray(random_matrix(rng, (2, 2, 48), spread=3), jnp.bfloat16)
    links = [jaxfp4.Link(w_o), jaxfp4.Link(wi, prologue=norm, epilogue=ep)]
    h, rot = jax.jit(lambda x: jaxfp4.matmul_chain(x, links))(x)
    assert isinstance(rot, tuple) and len(rot) == 3 and rot[0].shape == (2, 2, HEADS * 32)
    want_h = jaxfp4.matmul(x, w_o)
    _same((h, rot), (want_h, jaxfp4.matmul(want_h, wi, prologue=norm, epilogue=ep)))


def test_chain_rotary_link_feeds_the_next(rng):
    """A first rotary link's q (width heads * head_dim) is the next link's input."""
    _, wi = _qkv(rng, 48, 48)
    w_next = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (32, HEADS * 48), spread=2)))
    cos, sin, pos, kc, vc = _state(rng, 3, 1, 5, 48)
    ep = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS)
    x = jnp.asarray(random_matrix(rng, (3, 48), spread=3), jnp.bfloat16)
    rot, y = jaxfp4.matmul_chain(x, [jaxfp4.Link(wi, epilogue=ep), jaxfp4.Link(w_next)])
    want = jaxfp4.matmul(x, wi, epilogue=ep)
    _same((rot, y), (want, jaxfp4.matmul(want[0], w_next)))


def test_w4a4_and_float32(rng):
    """The GEMM, then the epilogue (RotaryKVCache.__call__ in jnp): W4A4 with a static
    input_scale (the fused op), with an NVFP4Tensor a (separate ops), and float32 out
    with float32 caches (q and k within a float32 FMA's rounding)."""
    _, wi = _qkv(rng, 32, 80)
    wi = jaxfp4.prepare_weights(wi)
    cos, sin, pos, kc, vc = _state(rng, 2, 2, 9, 32)
    ep, g = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS), jnp.float32(0.01)
    x = jnp.asarray(random_matrix(rng, (2, 2, 80), spread=3), jnp.bfloat16)
    _same(jaxfp4.matmul(x, wi, input_scale=g, epilogue=ep), ep(jaxfp4.matmul(x, wi, input_scale=g)))
    a = jaxfp4.quantize(x.reshape(4, 80))
    _same(jaxfp4.matmul(a, wi, epilogue=ep), ep(jaxfp4.matmul(a, wi)))
    ep32 = jaxfp4.RotaryKVCache(*_state(rng, 2, 2, 9, 32, dtype=jnp.float32), heads=HEADS)
    got = jaxfp4.matmul(x, wi, epilogue=ep32, out_dtype=jnp.float32)
    assert got[0].dtype == got[1].dtype == jnp.float32
    want = ep32(jaxfp4.matmul(x, wi, out_dtype=jnp.float32))
    for g, w in zip(got[:2], want[:2]):  # float32 shows where XLA contracted mul+sub to an FMA
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6 * np.abs(np.asarray(w)).max())
    _same(got[2], want[2])


def test_flax_dense(rng):
    """Dense(x, epilogue=RotaryKVCache) returns (q [..., heads * D], k_cache, v_cache), the
    matmul's; params from quantize_params of a kernel interleaved along axis=-1; .link takes
    it too; use_bias or a residual with the epilogue is an error naming the layer."""
    d, k, n = 32, 48, (HEADS + 2 * KV_HEADS) * 32
    kernel = jnp.asarray(random_matrix(rng, (n, k), spread=2)).T
    params = jfx.quantize_params({"params": {"kernel": jaxfp4.interleave_rotary(kernel, d, axis=-1)}})
    wi = jaxfp4.interleave_rotary(jaxfp4.quantize(kernel.T, sf_layout="linear"), d)
    _same(params["params"], jfx.dense_params(wi))
    cos, sin, pos, kc, vc = _state(rng, 2, 1, 6, d)
    ep = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS)
    x = jnp.asarray(random_matrix(rng, (2, 1, k), spread=3), jnp.bfloat16)
    dense = jfx.Dense(features=n, use_bias=False, mode="w4a16")
    got = dense.apply(params, x, epilogue=ep)
    assert got[0].shape == (2, 1, HEADS * d)
    _same(got, jaxfp4.matmul(x, wi, epilogue=ep))
    link = dense.apply(params, k, epilogue=ep, method=jfx.Dense.link)
    _same(jaxfp4.matmul_chain(x, [link])[0], got)
    with pytest.raises(ValueError, match="Dense at .*an epilogue needs use_bias=False"):
        jfx.Dense(n, use_bias=True).init(jax.random.key(0), x, epilogue=ep)
    with pytest.raises(ValueError, match="Dense at .*epilogue and residual together"):
        dense.apply(params, x, residual=jnp.ones((2, 1, HEADS * d), jnp.bfloat16), epilogue=ep)


def test_errors(rng):
    """Each rule's error names the argument."""
    _, wi = _qkv(rng, 32, 48)
    cos, sin, pos, kc, vc = _state(rng, 2, 1, 5, 32)
    x = jnp.asarray(random_matrix(rng, (2, 48), spread=3), jnp.bfloat16)
    call = lambda **kw: jaxfp4.matmul(x, wi, epilogue=jaxfp4.RotaryKVCache(  # noqa: E731
        **{"cos": cos, "sin": sin, "positions": pos, "k_cache": kc, "v_cache": vc, "heads": HEADS, **kw}))
    with pytest.raises(ValueError, match=r"RotaryKVCache.heads: the weight's N must be \(heads \+ 2 kv_heads\)"):
        call(heads=2)
    with pytest.raises(ValueError, match="RotaryKVCache.v_cache must match k_cache"):
        call(v_cache=vc[:, :4])
    with pytest.raises(ValueError, match="RotaryKVCache.v_cache must match k_cache"):
        call(v_cache=vc.astype(jnp.float16))
    with pytest.raises(TypeError, match="RotaryKVCache.k_cache: the caches must have the GEMM's out_dtype bfloat16"):
        call(k_cache=kc.astype(jnp.float32), v_cache=vc.astype(jnp.float32))
    with pytest.raises(ValueError, match="RotaryKVCache.k_cache must be"):
        call(k_cache=kc[0], v_cache=vc[0])
    with pytest.raises(ValueError, match="RotaryKVCache.positions must be integer"):
        call(positions=pos.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"RotaryKVCache.positions must be integer \[S\] or \[B=2, S\]"):
        call(positions=jnp.zeros((3, 1), jnp.int32))
    with pytest.raises(ValueError, match="RotaryKVCache.cos must be float32"):
        call(cos=cos[..., :8])
    with pytest.raises(ValueError, match="RotaryKVCache.sin must be float32"):
        call(sin=sin.astype(jnp.bfloat16))
    ep = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS)
    with pytest.raises(ValueError, match="RotaryKVCache.positions: the GEMM has 3 token rows"):
        jaxfp4.matmul(jnp.concatenate([x, x[:1]]), wi, epilogue=ep)
    with pytest.raises(ValueError, match="epilogue and residual together"):
        jaxfp4.matmul(x, wi, epilogue=ep, residual=jnp.ones((2, HEADS * 32), jnp.bfloat16))
    bad = jaxfp4.RotaryKVCache(cos[0, 0], sin, pos, kc, vc, heads=HEADS)
    with pytest.raises(ValueError, match=r"links\[0\]: RotaryKVCache.cos must be float32"):
        jaxfp4.matmul_chain(x, [jaxfp4.Link(wi, epilogue=bad)])


def test_lowering_is_the_composition_off_cuda(rng):
    """The op is gemm_chain_p (rotary_heads per link); CPU lowers its jnp composition, CUDA
    (bf16, prepared weights, M <= 32) names jaxfp4_gemm_chain, each cache aliased to its
    result; unprepared weights are the composition on CUDA too."""
    _, wi = _qkv(rng, 32, 48)
    w_o = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (48, 32), spread=2))))
    cos, sin, pos, kc, vc = _state(rng, 2, 1, 5, 32)
    x = jnp.asarray(random_matrix(rng, (2, 1, 32), spread=3), jnp.bfloat16)

    def fn(x, kc, vc, w=jaxfp4.prepare_weights(wi)):
        ep = jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS)
        return jaxfp4.matmul_chain(x, [jaxfp4.Link(w_o), jaxfp4.Link(w, epilogue=ep)])

    jaxpr = jax.make_jaxpr(fn)(x, kc, vc).jaxpr
    (eqn,) = [e for e in jaxpr.eqns if e.primitive is gemm_chain_p]
    assert eqn.params["rotary_heads"] == (0, HEADS)
    assert gemm_chain._native("cpu", eqn.params) is None
    target, _, aliases = gemm_chain._native("cuda", eqn.params)
    assert target == "jaxfp4_gemm_chain"
    assert {o: eqn.invars[i] for i, o in aliases.items()} == {2: jaxpr.invars[1], 3: jaxpr.invars[2]}
    assert "jaxfp4_gemm_chain" not in jax.jit(fn).lower(x, kc, vc).as_text()
    avals = [v.aval for v in eqn.invars]
    assert gemm_chain._choose("cuda", avals, eqn.params) is None
    assert gemm_chain._choose("cpu", avals, eqn.params)[1] is gemm_chain._compose
    (plain,) = [e for e in jax.make_jaxpr(lambda x: fn(x, kc, vc, wi))(x).eqns if e.primitive is gemm_chain_p]
    assert gemm_chain._choose("cuda", [v.aval for v in plain.invars], plain.params)[1] is gemm_chain._compose
    matmul = lambda x: jaxfp4.matmul(x, wi, epilogue=jaxfp4.RotaryKVCache(cos, sin, pos, kc, vc, heads=HEADS))
    (one,) = [e for e in jax.make_jaxpr(matmul)(jax.ShapeDtypeStruct((2, 1, 48), jnp.bfloat16)).eqns
              if e.primitive is gemm_chain_p]
    assert one.params["rotary_heads"] == (HEADS,)  # matmul with the epilogue: a one-link chain
