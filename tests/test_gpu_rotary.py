"""qkv_proj's RotaryKVCache epilogue in the packed kernel's store (a
jaxfp4_gemm_chain link with epilogue 2, csrc/cuda/sm90/gemm_small_m_common.cuh
store_rotary) on the GPU.

Every case runs on fresh random operands: q into NaN-poisoned memory (an
output the kernel does not write stays NaN and fails), the caches random, so
a row written that should not be (or not written that should) fails. The
reference is the same kernel's product without the epilogue (the same sums,
so the same bf16 values), de-interleaved, then RoPE in numpy float32 with
each product and sum rounded on its own (the kernel's __fmul_rn / __fsub_rn
order) and rounded to bf16: equal bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4 import format as fmt

from data import random_matrix
from test_gpu_epilogue import SWIGLU, _gate_up, _run
from test_gpu_fused import EPS
from test_gpu_gemm import _dev, _pack, random_nvfp4

BF16 = ml_dtypes.bfloat16
F8 = ml_dtypes.float8_e4m3fn


def _qkv(rng, heads, kv_heads, d, k):
    """(plain NVFP4 weight [N, K], the interleaved prepared one)."""
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, ((heads + 2 * kv_heads) * d, k), spread=2)),
                        sf_layout="linear")
    return w, jaxfp4.prepare_weights(jaxfp4.interleave_rotary(w, d))


def _epilogue(rng, b, s, t, heads, kv_heads, d, positions=None):
    if positions is None:  # distinct slots within a batch row (two writes of one slot: either may land)
        positions = np.stack([rng.permutation(t)[:s] for _ in range(b)])
    positions = jnp.asarray(positions, jnp.int32)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
    cos, sin = jaxfp4.rope_tables(positions, inv_freq)
    cache = lambda: jnp.asarray(random_matrix(rng, (b * t, kv_heads * d)).reshape(b, t, kv_heads, d),  # noqa: E731
                                jnp.bfloat16)
    return jaxfp4.RotaryKVCache(cos, sin, positions, cache(), cache(), heads=heads)


def expected(product, e):
    """(q, k_cache, v_cache) from the interleaved bf16 product [B*S, N] (numpy, float32
    products and sums rounded one by one, as the kernel)."""
    kc, vc = np.asarray(e.k_cache, np.float32), np.asarray(e.v_cache, np.float32)
    b, t, kvh, d = kc.shape
    y = np.asarray(product, np.float32)
    r, n = y.shape
    h = n // d
    y = y.reshape(r, h, d // 16, 2, 8).swapaxes(-3, -2).reshape(r, h, d)  # plain head dims
    x1, x2 = y[..., : d // 2], y[..., d // 2:]
    s = np.asarray(e.positions).shape[-1]
    cos = np.broadcast_to(np.asarray(e.cos), (b, s, d // 2)).reshape(r, 1, d // 2)
    sin = np.broadcast_to(np.asarray(e.sin), (b, s, d // 2)).reshape(r, 1, d // 2)
    rot = np.concatenate([np.float32(x1 * cos) - np.float32(x2 * sin), np.float32(x2 * cos) + np.float32(x1 * sin)],
                         -1)
    rot = rot.astype(BF16).astype(np.float32)
    q = rot[:, : e.heads].reshape(r, -1)
    pos = np.broadcast_to(np.asarray(e.positions), (b, s)).reshape(r)
    for row in range(r):
        if 0 <= pos[row] < t:
            kc[row // s, pos[row]] = rot[row, e.heads:e.heads + kvh]
            vc[row // s, pos[row]] = y[row, e.heads + kvh:]
    return q, kc, vc


def assert_rotary_equal(got, product, e):
    q, kc, vc = (np.asarray(x, np.float32) for x in got)
    want = expected(product, e)
    assert np.isfinite(q).all(), "q has unwritten (NaN) entries"
    for name, g, w in zip(("q", "k_cache", "v_cache"), (q, kc, vc), want):
        np.testing.assert_array_equal(g.reshape(w.shape), w, err_msg=name)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("m", range(1, 34))
def test_every_m(rng, m):
    """Decode steps of M = 1..33 batch rows (32 is the kernel's last; 33 the composition):
    4 q heads, 2 kv heads of 64, K = 272, a 9-slot cache."""
    w, wr = _qkv(rng, 4, 2, 64, 272)
    e = _epilogue(rng, m, 1, 9, 4, 2, 64)
    x = jnp.asarray(random_matrix(rng, (m, 1, 272), spread=3), jnp.bfloat16)
    got = _run(lambda x, e: jaxfp4.matmul(x, wr, epilogue=e), x, e)
    info = jaxfp4.backend_info()
    path = info["lowered"]["gemm_chain[cuda]"]
    assert path == ("jaxfp4_gemm_chain" if m <= 32 else "separate fused ops")
    if m <= 32:
        tiles = 8 if m <= 8 else 16 if m <= 16 else 32
        assert info["kernels_run"]["gemm"] == f"sm90_gemm_small_m_w4a16_bf16_n{tiles}_packed_rotary_kv_out"
    assert_rotary_equal(got, _rows(jaxfp4.matmul(x, wr)), e)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,d,k,b,s", [(32, 8, 128, 4096, 1, 1), (32, 8, 128, 4096, 4, 1),
                                                    (1, 1, 16, 16, 3, 1), (2, 1, 48, 48, 2, 2),
                                                    (5, 3, 32, 208, 9, 1), (3, 1, 80, 4096, 2, 8)])
def test_shapes(rng, heads, kv_heads, d, k, b, s):
    """The 8B qkv (32/8 heads of 128), ragged head dims (16, 48, 80), K = 16, 48, 208,
    several tokens per batch row (S = 2, 8)."""
    w, wr = _qkv(rng, heads, kv_heads, d, k)
    e = _epilogue(rng, b, s, 11, heads, kv_heads, d)
    x = jnp.asarray(random_matrix(rng, (b, s, k), spread=3), jnp.bfloat16)
    got = _run(lambda x, e: jaxfp4.matmul(x, wr, epilogue=e), x, e)
    assert_rotary_equal(got, _rows(jaxfp4.matmul(x, wr)), e)


@pytest.mark.gpu
def test_positions_out_of_range_write_nothing(rng):
    """Slots outside [0, T) are skipped; the other rows of the batch are written."""
    w, wr = _qkv(rng, 2, 1, 32, 64)
    e = _epilogue(rng, 4, 1, 6, 2, 1, 32, positions=[[-1], [6], [100], [2]])
    x = jnp.asarray(random_matrix(rng, (4, 1, 64), spread=3), jnp.bfloat16)
    got = _run(lambda x, e: jaxfp4.matmul(x, wr, epilogue=e), x, e)
    assert_rotary_equal(got, _rows(jaxfp4.matmul(x, wr)), e)
    np.testing.assert_array_equal(np.asarray(got[1])[:3], np.asarray(e.k_cache)[:3])


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
def test_with_rms_norm_and_w4a4(rng, m):
    """With the RMSNorm prologue at M = 1 (staged rows), and W4A4 (in-kernel quantization)."""
    k = 4096
    w, wr = _qkv(rng, 8, 2, 128, k)
    e = _epilogue(rng, m, 1, 7, 8, 2, 128)
    x = jnp.asarray(random_matrix(rng, (m, 1, k), spread=3), jnp.bfloat16)
    if m == 1:
        norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(k), jnp.bfloat16), EPS)
        got = _run(lambda x, e: jaxfp4.matmul(x, wr, prologue=norm, epilogue=e), x, e)
        assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a16_bf16_n8_packed_staged_rotary_kv_out"
        assert_rotary_equal(got, _rows(jaxfp4.matmul(x, wr, prologue=norm)), e)
    g_a = jnp.float32(np.abs(np.asarray(x, np.float32)).max() / 2688)
    got = _run(lambda x, e: jaxfp4.matmul(x, wr, input_scale=g_a, epilogue=e), x, e)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_rotary_kv_out"
    assert_rotary_equal(got, _rows(jaxfp4.matmul(x, wr, input_scale=g_a)), e)


@pytest.mark.gpu
def test_decoder_chain_with_the_next_qkv(rng):
    """o_proj, gate_up (SwiGLU epilogue), down and the next layer's qkv (RMSNorm prologue,
    rotary epilogue) as one jaxfp4_gemm_chain, the caches donated: bit for bit the links'
    own calls."""
    d, f = 4096, 14336
    prep = lambda n, k: jaxfp4.prepare_weights(jaxfp4.quantize(  # noqa: E731
        jnp.asarray(random_matrix(rng, (n, k), spread=2)), sf_layout="linear"))
    x = jnp.asarray(random_matrix(rng, (1, 1, d), spread=3), jnp.bfloat16)
    attn = jnp.asarray(random_matrix(rng, (1, 1, d), spread=3), jnp.bfloat16)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(d), jnp.bfloat16), EPS)
    _, wr = _qkv(rng, 32, 8, 128, d)
    e = _epilogue(rng, 1, 1, 17, 32, 8, 128)
    links = lambda e: [jaxfp4.Link(prep(d, d), residual=x),  # noqa: E731
                       jaxfp4.Link(_gate_up(rng, f, d), prologue=norm, epilogue=SWIGLU),
                       jaxfp4.Link(prep(d, f), residual=0), jaxfp4.Link(wr, prologue=norm, epilogue=e)]
    ls = links(e)
    step = jax.jit(lambda a, kc, vc: jaxfp4.matmul_chain(a, [*ls[:3], ls[3]._replace(
        epilogue=jaxfp4.RotaryKVCache(e.cos, e.sin, e.positions, kc, vc, heads=32))]), donate_argnums=(1, 2))
    kc0, vc0 = np.asarray(e.k_cache), np.asarray(e.v_cache)
    step.lower(attn, e.k_cache, e.v_cache)
    got = step(attn, jnp.array(kc0), jnp.array(vc0))
    assert jaxfp4.backend_info()["lowered"]["gemm_chain[cuda]"] == "jaxfp4_gemm_chain"
    h = jaxfp4.matmul(attn, ls[0].weight, residual=x)
    act = jaxfp4.matmul(h, ls[1].weight, prologue=norm, epilogue=SWIGLU)
    y = jaxfp4.matmul(act, ls[2].weight, residual=h)
    for i, (g, w) in enumerate(zip(got[:3], [h, act, y])):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=f"link {i}")
    e0 = jaxfp4.RotaryKVCache(e.cos, e.sin, e.positions, jnp.array(kc0), jnp.array(vc0), heads=32)
    assert_rotary_equal(got[3], _rows(jaxfp4.matmul(y, wr, prologue=norm)), e0)


def _chain_call(rng, *, alias=True, cos_cols=None, out_heads=2):
    """jaxfp4_gemm_chain with one rotary link, called directly (M = 2, 2/1 heads of 32)."""
    heads = 2
    m, k, d, kvh, t = 2, 64, 32, 1, 5
    bd, bs, bg = random_nvfp4(rng, (), (2 + 2 * kvh) * d, k, "linear")
    bd, bs = _pack(bd, bs, "linear")
    empty = np.zeros((0,), BF16)
    cache = random_matrix(rng, (m * t, kvh * d)).reshape(m, t, kvh, d).astype(BF16)
    cos = rng.random((m, cos_cols or d // 2), dtype=np.float32)
    ops = [random_matrix(rng, (m, k)).astype(BF16), empty, np.zeros((0,), np.float32), bd, bs.view(F8),
           np.asarray(bg, np.float32).reshape(()), empty, cos, cos, np.arange(m, dtype=np.int32), cache, cache.copy()]
    outs = [jax.ShapeDtypeStruct((m, out_heads * d), BF16), jax.ShapeDtypeStruct(cache.shape, BF16),
            jax.ShapeDtypeStruct(cache.shape, BF16)]
    call = jax.ffi.ffi_call("jaxfp4_gemm_chain", outs, input_output_aliases={10: 1, 11: 2} if alias else None)
    i32 = lambda v: np.array([v], np.int32)  # noqa: E731
    return jax.block_until_ready(call(
        *[_dev(o) for o in ops], prologue=i32(0), eps=np.array([0.0], np.float32), epilogue=i32(2),
        b_sf_layout=i32(fmt.SF_LAYOUT_IDS["linear"]), b_packing=i32(1), res_from=i32(-1), rotary_heads=i32(heads)))


@pytest.mark.gpu
def test_handler_rejects_what_it_cannot_run(rng):
    """Calls the Python side never makes get an error naming the rule."""
    _chain_call(rng)  # the well-formed call runs
    with pytest.raises(Exception, match="cache results must alias their operands"):
        _chain_call(rng, alias=False)
    with pytest.raises(Exception, match="cos"):
        _chain_call(rng, cos_cols=8)
    with pytest.raises(Exception, match=r"out must be \[M, heads \* head_dim\]"):
        _chain_call(rng, out_heads=3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 4, 16])
def test_prologue_at_more_rows_keeps_the_epilogue_in_the_kernel(rng, m):
    """A rotary link with the RMSNorm prologue at M > 1 (which the kernel's prologue does
    not take): the norm in XLA, then the link alone, its epilogue still in the kernel."""
    d = 1024
    _, wr = _qkv(rng, 8, 2, 64, d)
    e = _epilogue(rng, m, 1, 9, 8, 2, 64)
    x = jnp.asarray(random_matrix(rng, (m, 1, d), spread=3), jnp.bfloat16)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(d), jnp.bfloat16), EPS)
    got = _run(lambda x, e: jaxfp4.matmul(x, wr, prologue=norm, epilogue=e), x, e)
    tiles = 8 if m <= 8 else 16
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == f"sm90_gemm_small_m_w4a16_bf16_n{tiles}_packed_rotary_kv_out"
    assert_rotary_equal(got, _rows(jaxfp4.matmul(x, wr, prologue=norm)), e)
