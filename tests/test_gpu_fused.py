"""The fused GEMM on the GPU (jaxfp4_gemm_fused, csrc/cuda/sm90/gemm_staged_act.cuh):
an RMSNorm or SwiGLU prologue staged in shared memory (W4A4: then quantized in
place), and a residual added in the store.

The FFI target is called directly (every case reaches the kernel) on fresh
random operands, into a freshly NaN-poisoned allocation. The prologue's output
is checked through the GEMM: against a float64 oracle of the GEMM of the
prologue's exact values rounded once to bf16 (the kernel computes them in
float32, so a value near a rounding tie may round the other way: an allowance
of two such terms per output). The residual is checked bit for bit: the
kernel's own product rounded to bf16, plus the residual, rounded again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4 import format as fmt
from jaxfp4.fused import add_residual
from jaxfp4.primitives.fused_gemm import PROLOGUE_MAX_M

import oracle
from data import random_matrix
from test_gpu_gemm import (_dev, _gpu, _pack, assert_close, ffi_w4a4_quantize_a, ffi_w4a16, random_nvfp4,
                           values_f64)

BF16 = ml_dtypes.bfloat16
F8 = ml_dtypes.float8_e4m3fn
PROLOGUE_IDS = {"none": 0, "rms_norm": 1, "swiglu": 2}
EPS = 1e-5


def _poison():
    junk = jnp.full((64 << 20,), jnp.nan, jnp.float32, device=_gpu())
    junk.block_until_ready()
    junk.delete()


def ffi_fused(a, norm_w, b_data, b_scales, b_g, residual, n, *, prologue, layout, packed=True, out_dtype=BF16,
              a_g=None, epilogue=0):
    """jaxfp4_gemm_fused: a [M, K] (swiglu [M, 2K]) bf16 -> [M, n] (n = N, or N/2 with
    epilogue 1); W4A4 with a_g."""
    if packed:
        b_data, b_scales = _pack(b_data, b_scales, layout)
    empty = np.zeros((0,), BF16)
    call = jax.ffi.ffi_call("jaxfp4_gemm_fused", jax.ShapeDtypeStruct((a.shape[0], n), out_dtype))
    _poison()
    a_g = np.zeros((0,), np.float32) if a_g is None else np.asarray(a_g, np.float32).reshape(())
    out = call(_dev(a), _dev(empty if norm_w is None else norm_w), _dev(a_g), _dev(b_data), _dev(b_scales.view(F8)),
               _dev(np.asarray(b_g, np.float32).reshape(())), _dev(empty if residual is None else residual),
               prologue=np.int32(PROLOGUE_IDS[prologue]), eps=np.float32(EPS), epilogue=np.int32(epilogue),
               b_sf_layout=np.int32(fmt.SF_LAYOUT_IDS[layout]), b_packing=np.int32(1 if packed else 0))
    return np.asarray(out)


def staged(a, norm_w, prologue):
    """The prologue's values: exact (float64), rounded once to bf16."""
    x = a.astype(np.float64)
    if prologue == "rms_norm":
        v = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * norm_w.astype(np.float64)
    elif prologue == "swiglu":
        g, u = np.split(x, 2, axis=-1)
        with np.errstate(over="ignore"):  # exp(-g) = inf for very negative g: silu(g) = -0
            v = g / (1 + np.exp(-g)) * u
    else:
        v = x
    return v.astype(BF16).astype(np.float64)


def check_fused(rng, m, n, k, prologue, *, layout="linear", residual=True, out_dtype=BF16, packed=True):
    a = random_matrix(rng, (m, 2 * k if prologue == "swiglu" else k), spread=3).astype(BF16)
    norm_w = (0.5 + rng.random(k)).astype(BF16) if prologue == "rms_norm" else None
    bd, bs, bg = random_nvfp4(rng, (), n, k, layout)
    out = ffi_fused(a, norm_w, bd, bs, bg, None, n, prologue=prologue, layout=layout, packed=packed,
                    out_dtype=out_dtype)
    kernel = jaxfp4.backend_info()["kernels_run"]["gemm"]
    if prologue != "none":
        assert kernel == f"sm90_gemm_small_m_w4a16_bf16_n8_packed_{prologue}", kernel
    x = staged(a, norm_w, prologue)
    w = values_f64(bd, bs, layout)
    ref, absref = oracle.gemm_f64(x, w, bg)
    # at most two terms a bf16 ulp off (bounded by the largest |x| times the largest |w|)
    two_flips = 0.0 if prologue == "none" else (
        2 * 2.0 ** -8 * np.abs(x).max(-1)[:, None] * np.abs(w).max(-1)[None, :] * abs(float(bg)))
    assert out.shape == (m, n)
    assert_close(out, ref, absref + two_flips / (k * 2.0 ** -23), k)
    if prologue == "none":  # the ordinary kernel's product, bit for bit
        plain = ffi_w4a16(a, bd, bs, bg, n, layout=layout, packed=packed, out_dtype=out_dtype)
        np.testing.assert_array_equal(out.view(np.uint16), plain.view(np.uint16))
    if residual:
        r = rng.standard_normal((m, n)).astype(BF16)
        summed = ffi_fused(a, norm_w, bd, bs, bg, r, n, prologue=prologue, layout=layout, packed=packed)
        want = (out.astype(np.float32) + r.astype(np.float32)).astype(BF16)
        np.testing.assert_array_equal(summed.view(np.uint16), want.view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", range(1, 9))
def test_rms_norm_every_m(rng, m):
    """M = 1..8, K = 16, 48, 272, 4096 in turn, N = 200 (a ragged tile), all three weight scale layouts."""
    k = (16, 48, 272, 4096)[m % 4]
    check_fused(rng, m, 200, k, "rms_norm", layout=("linear", "128x4", "8x4")[m % 3])


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (8, 6144, 4096), (3, 1000, 11008), (1, 37, 16)])
def test_rms_norm_shapes(rng, m, n, k):
    check_fused(rng, m, n, k, "rms_norm", residual=m != 8)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 200, 272), (2, 4096, 14336), (1, 1000, 14336), (5, 200, 48), (8, 37, 4096),
                                   (7, 200, 16)])
def test_swiglu(rng, m, n, k):
    """K = 14336 (the 8B down_proj): two rows of 28.7 KB fit the staged rows' 80 KB."""
    check_fused(rng, m, n, k, "swiglu")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_prologue_other_out_dtypes(rng, out_dtype):
    """Without a residual any output dtype (the lm_head's float32 logits)."""
    check_fused(rng, 4, 200, 272, "rms_norm", residual=False, out_dtype=out_dtype)
    check_fused(rng, 2, 200, 48, "swiglu", residual=False, out_dtype=out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 9, 16, 31, 32])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
def test_residual_alone(rng, m, packed):
    """No prologue: the ordinary small-M kernels (every token tile count), their store adding the residual."""
    check_fused(rng, m, 200, 272, "none", packed=packed, layout="128x4")


@pytest.mark.gpu
def test_handler_rejects_what_it_cannot_run(rng):
    """Shapes the Python side never sends get an error, not a crash or a wild write."""
    bd, bs, bg = random_nvfp4(rng, (), 32, 64, "linear")
    a9 = random_matrix(rng, (9, 64)).astype(BF16)
    with pytest.raises(Exception, match="a fused prologue or W4A4 needs M <= 8"):
        ffi_fused(a9, (0.5 + rng.random(64)).astype(BF16), bd, bs, bg, None, 32, prologue="rms_norm",
                  layout="linear")
    with pytest.raises(Exception, match="norm_w must be BF16"):
        ffi_fused(a9[:2], np.ones(32, BF16), bd, bs, bg, None, 32, prologue="rms_norm", layout="linear")
    with pytest.raises(Exception, match="a fused prologue or W4A4 needs sm90-packed weights"):
        ffi_fused(a9[:2], None, bd, bs, bg, None, 32, prologue="swiglu", layout="linear", packed=False)


# ---- through the public API ---------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 33])
def test_matmul_api(rng, m):
    """jaxfp4.matmul(prologue=, residual=) runs the fused kernel for M <= PROLOGUE_MAX_M, the
    norm in XLA then the residual in the GEMM kernel up to M = 32, else separate ops; the
    values of the separate ops up to the prologue's last-bit rounding."""
    n, k = 1000, 4096
    w = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k), spread=2)),
                                               sf_layout="linear"))
    x = jnp.asarray(random_matrix(rng, (m, k), spread=3), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(k), jnp.bfloat16), EPS)
    got = jax.jit(lambda x, r: jaxfp4.matmul(x, w, prologue=norm, residual=r))(x, r)
    info = jaxfp4.backend_info()
    if m <= PROLOGUE_MAX_M:
        assert info["lowered"]["fused_gemm[cuda]"] == "jaxfp4_gemm_fused"
        assert info["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a16_bf16_n8_packed_rms_norm"
    elif m <= 32:  # the residual still in the kernel's store
        assert info["lowered"]["fused_gemm[cuda]"] == "jaxfp4_gemm_fused"
        assert info["kernels_run"]["gemm"] == f"sm90_gemm_small_m_w4a16_bf16_n{8 if m <= 8 else 16}_packed"
    else:
        assert info["lowered"]["fused_gemm[cuda]"].startswith("prologue + gemm + residual")
    want = np.asarray(add_residual(jaxfp4.matmul(norm(x), w), r), np.float32)
    got = np.asarray(got, np.float32)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=2e-3 * np.abs(want).max())
    # and SwiGLU into float32
    x2 = jnp.asarray(random_matrix(rng, (m, 2 * k), spread=1), jnp.bfloat16)
    got = np.asarray(jaxfp4.matmul(x2, w, prologue=jaxfp4.SwiGLU(), out_dtype=jnp.float32))
    want = np.asarray(jaxfp4.matmul(jaxfp4.SwiGLU()(x2), w, out_dtype=jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=2e-3 * np.abs(want).max())


# ---- W4A4: the staged rows quantized in place ------------------------------------------------

def _w4a4_operands(rng, m, n, k, x):
    g_a = np.float32(np.abs(x.astype(np.float32)).max() / 2688 * rng.uniform(0.5, 2.0))
    bd, bs, bg = random_nvfp4(rng, (), n, k, "128x4", g_exp=(-12, -9))
    return g_a, bd, bs, bg


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
def test_w4a4_residual_alone(rng, m):
    """No prologue: the in-kernel quantization's kernel, bit for bit, plus the residual."""
    n, k = 200, 272
    a = random_matrix(rng, (m, k), spread=3).astype(BF16)
    g_a, bd, bs, bg = _w4a4_operands(rng, m, n, k, a)
    out = ffi_fused(a, None, bd, bs, bg, None, n, prologue="none", layout="128x4", a_g=g_a)
    want = ffi_w4a4_quantize_a(a, g_a, bd, bs, bg, n, layout="128x4", out_dtype=BF16)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    r = rng.standard_normal((m, n)).astype(BF16)
    summed = ffi_fused(a, None, bd, bs, bg, r, n, prologue="none", layout="128x4", a_g=g_a)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a4_n8_packed_quantize_a"
    np.testing.assert_array_equal(summed.view(np.uint16),
                                  (out.astype(np.float32) + r.astype(np.float32)).astype(BF16).view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 200, 272), (2, 1000, 14336), (5, 37, 4096), (8, 200, 48)])
def test_w4a4_swiglu_exact(rng, m, n, k):
    """Gates >= 17 make silu(gate) = gate exactly in float32 (sigmoid rounds to 1), so the
    staged rows are exactly bf16(gate * up): the fused kernel must then give the bits of
    the in-kernel quantization of those rows (itself quantize + W4A4, bit for bit)."""
    gate = rng.uniform(17, 120, size=(m, k)).astype(BF16)
    up = random_matrix(rng, (m, k), spread=2).astype(BF16)
    staged_rows = (gate.astype(np.float64) * up.astype(np.float64)).astype(BF16)
    g_a, bd, bs, bg = _w4a4_operands(rng, m, n, k, staged_rows)
    r = rng.standard_normal((m, n)).astype(BF16)
    a = np.concatenate([gate, up], -1)
    out = ffi_fused(a, None, bd, bs, bg, None, n, prologue="swiglu", layout="128x4", a_g=g_a)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_swiglu"
    want = ffi_w4a4_quantize_a(staged_rows, g_a, bd, bs, bg, n, layout="128x4", out_dtype=BF16)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    summed = ffi_fused(a, None, bd, bs, bg, r, n, prologue="swiglu", layout="128x4", a_g=g_a)
    np.testing.assert_array_equal(summed.view(np.uint16),
                                  (out.astype(np.float32) + r.astype(np.float32)).astype(BF16).view(np.uint16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 8])
def test_w4a4_rms_norm(rng, m):
    """RMSNorm, then quantized in place: against the separate ops on the GPU (the norm in
    XLA, then the in-kernel quantization's kernel). A staged value a bf16 ulp off can move
    its code one step, so this compares to a fraction of the output's scale; the exact
    quantization path is test_w4a4_swiglu_exact's."""
    n, k = 1000, 4096
    x = random_matrix(rng, (m, k), spread=3).astype(BF16)
    nw = (0.5 + rng.random(k)).astype(BF16)
    normed = np.asarray(jaxfp4.RMSNorm(_dev(nw), EPS)(_dev(x)))
    g_a, bd, bs, bg = _w4a4_operands(rng, m, n, k, normed)
    out = ffi_fused(x, nw, bd, bs, bg, None, n, prologue="rms_norm", layout="128x4", a_g=g_a,
                    out_dtype=np.float32)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_rms_norm"
    want = ffi_w4a4_quantize_a(normed, g_a, bd, bs, bg, n, layout="128x4", out_dtype=np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=0, atol=0.02 * np.abs(want).max())
    assert np.mean(out == want) > 0.5  # most outputs see no staged value off by an ulp


@pytest.mark.gpu
def test_matmul_api_w4a4(rng):
    """matmul(input_scale=, prologue=, residual=) is the fused kernel for M <= 8."""
    n, k, m = 1000, 4096, 1
    w = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k), spread=2)),
                                               sf_layout="linear"))
    x = jnp.asarray(random_matrix(rng, (m, 2 * k), spread=1), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    got = jax.jit(lambda x, r: jaxfp4.matmul(x, w, input_scale=0.01, prologue=jaxfp4.SwiGLU(), residual=r))(x, r)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"] == "sm90_gemm_small_m_w4a4_n8_packed_quantize_a_swiglu"
    want = np.asarray(add_residual(jaxfp4.matmul(jaxfp4.SwiGLU()(x), w, input_scale=0.01), r), np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.02 * np.abs(want).max())


@pytest.mark.gpu
@pytest.mark.parametrize("m", [9, 16, 17, 32])
def test_w4a4_residual_decoded_rows(rng, m):
    """W4A4 + residual for 9..32 rows: quantize, decode, and the W4A16 kernel storing
    the residual (fused_gemm._quantized_then_fused), bit for bit the separate ops."""
    n, k = 1000, 4096
    w = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k), spread=2))))
    x = jnp.asarray(random_matrix(rng, (m, k), spread=2), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    fn = jax.jit(lambda x, r: jaxfp4.matmul(x, w, input_scale=0.01, residual=r))
    fn.lower(x, r)
    _poison()
    got = fn(x, r)
    assert jaxfp4.backend_info()["kernels_run"]["gemm"].startswith("sm90_gemm_small_m_w4a16_bf16_n")
    assert "w4a4_decoded" in jaxfp4.backend_info()["lowered"]["fused_gemm[cuda]"]
    want = add_residual(jax.jit(lambda x: jaxfp4.matmul(x, w, input_scale=0.01))(x), r)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))
    # With the norm (in XLA, each jit its own reduction order: a normed value may round
    # the other way and quantize to the next code, so close rather than equal).
    norm = jaxfp4.RMSNorm(jnp.asarray(1 + 0.1 * rng.standard_normal(k), jnp.bfloat16), 1e-5)
    got = jax.jit(lambda x, r: jaxfp4.matmul(x, w, input_scale=0.01, prologue=norm, residual=r))(x, r)
    want = add_residual(jax.jit(lambda x: jaxfp4.matmul(norm(x), w, input_scale=0.01))(x), r)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=0.02 * np.abs(want).max())


# ---- chains: jaxfp4_gemm_chain (jaxfp4.matmul_chain) ------------------------------------------

def _prepared(rng, n, k):
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (n, k), spread=2)), sf_layout="linear")
    return jaxfp4.prepare_weights(w)


def _links_one_by_one(a, links):
    outs, x = [], a
    for link in links:
        r = outs[link.residual] if isinstance(link.residual, int) else link.residual
        x = jaxfp4.matmul(x, link.weight, input_scale=link.input_scale, prologue=link.prologue, residual=r)
        outs.append(x)
    return outs


def _check_chain(rng, a, links):
    """The chain (one jaxfp4_gemm_chain call, outputs in poisoned memory) against its links'
    own calls, bit for bit; every output finite and not all zero."""
    fn = jax.jit(lambda a: jaxfp4.matmul_chain(a, links))
    fn.lower(a)  # lowered (and the path noted) before the poisoning
    _poison()
    got = fn(a)
    assert jaxfp4.backend_info()["lowered"]["gemm_chain[cuda]"] == "jaxfp4_gemm_chain"
    want = jax.jit(lambda a: _links_one_by_one(a, links))(a)
    for i, (y, w) in enumerate(zip(got, want)):
        y, w = np.asarray(y, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(y).all() and np.abs(y).max() > 0, f"link {i}"
        np.testing.assert_array_equal(y, w, err_msg=f"link {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("w4a4", [False, True], ids=["w4a16", "w4a4"])
@pytest.mark.parametrize("d,f,k0", [(4096, 14336, 4096), (272, 720, 208)])
def test_chain_decoder_tail(rng, d, f, k0, w4a4):
    """o_proj + residual, gate_up with the RMSNorm, down with the SwiGLU + link 0's output, at M = 1."""
    x = jnp.asarray(random_matrix(rng, (1, d), spread=3), jnp.bfloat16)
    attn = jnp.asarray(random_matrix(rng, (1, k0), spread=3), jnp.bfloat16)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(d), jnp.bfloat16), EPS)
    s = {"input_scale": jnp.float32(0.02)} if w4a4 else {}
    links = [jaxfp4.Link(_prepared(rng, d, k0), residual=x, **s),
             jaxfp4.Link(_prepared(rng, 2 * f, d), prologue=norm, **s),
             jaxfp4.Link(_prepared(rng, d, f), prologue=jaxfp4.SwiGLU(), residual=0, **s)]
    _check_chain(rng, attn, links)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 8, 9, 31, 32])
def test_chain_without_prologues(rng, m):
    """Residual-only links run the ordinary small-M kernels (W4A16 up to 32 rows; W4A4 the
    in-kernel quantization's, up to 8), ragged N and K."""
    a = jnp.asarray(random_matrix(rng, (m, 336), spread=3), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((m, 1008)), jnp.bfloat16)
    ws = [_prepared(rng, 1008, 336), _prepared(rng, 208, 1008), _prepared(rng, 1008, 208)]
    _check_chain(rng, a, [jaxfp4.Link(ws[0], residual=r), jaxfp4.Link(ws[1]), jaxfp4.Link(ws[2], residual=0)])
    if m <= 8:
        s = {"input_scale": jnp.float32(0.05)}
        _check_chain(rng, a, [jaxfp4.Link(ws[0], residual=r, **s), jaxfp4.Link(ws[1], **s),
                              jaxfp4.Link(ws[2], residual=0, **s)])


@pytest.mark.gpu
def test_chain_weights_made_just_before(rng):
    """Eager: link 1's weights come from the kernels just before the call. Its kernel copies
    them before waiting on link 0, so the call's first launch must not start early."""
    for _ in range(3):
        a = jnp.asarray(random_matrix(rng, (1, 4096), spread=3), jnp.bfloat16)
        w0 = _prepared(rng, 4096, 4096)
        w1 = jaxfp4.prepare_weights(jaxfp4.quantize(jnp.asarray(random_matrix(rng, (6144, 4096), spread=2)),
                                                    sf_layout="linear"))
        got = jaxfp4.matmul_chain(a, [jaxfp4.Link(w0), jaxfp4.Link(w1)])
        want = _links_one_by_one(a, [jaxfp4.Link(w0), jaxfp4.Link(w1)])
        for y, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(w, np.float32))


@pytest.mark.gpu
def test_chain_handler_rejects_what_it_cannot_run(rng):
    """A link it cannot run fails the whole call, naming the link, before anything launches."""
    empty_b, empty_f = np.zeros((0,), BF16), np.zeros((0,), np.float32)

    def link(n, k):
        bd, bs, bg = random_nvfp4(rng, (), n, k, "linear")
        bd, bs = _pack(bd, bs, "linear")
        return [empty_b, empty_f, bd, bs.view(F8), np.asarray(bg, np.float32).reshape(()), empty_b]
    a = random_matrix(rng, (9, 64)).astype(BF16)
    # link 1 gets link 0's [9, 128] output, but its weights are for K = 64
    call = jax.ffi.ffi_call("jaxfp4_gemm_chain", [jax.ShapeDtypeStruct((9, 128), BF16),
                                                  jax.ShapeDtypeStruct((9, 32), BF16)])
    ops = [_dev(x) for x in [a, *link(128, 64), *link(32, 64)]]
    attrs = dict(eps=np.zeros(2, np.float32), epilogue=np.zeros(2, np.int32),
                 b_sf_layout=np.full(2, fmt.SF_LAYOUT_IDS["linear"], np.int32), b_packing=np.ones(2, np.int32),
                 res_from=np.array([-1, -1], np.int32), rotary_heads=np.zeros(2, np.int32))
    with pytest.raises(Exception, match=r"jaxfp4 gemm \(cuda\): chain link 1: "):
        jax.block_until_ready(call(*ops, prologue=np.array([0, 0], np.int32), **attrs))
    with pytest.raises(Exception, match=r"gemm \(cuda\): chain link 0: a fused prologue or W4A4 needs M <= 8"):
        jax.block_until_ready(call(*ops, prologue=np.array([2, 0], np.int32), **attrs))
    with pytest.raises(Exception, match="res_from must name an earlier link"):
        jax.block_until_ready(call(*ops, prologue=np.array([0, 0], np.int32),
                                   **{**attrs, "res_from": np.array([-1, 1], np.int32)}))
    with pytest.raises(Exception, match="rotary_heads is set on a link without the rotary epilogue"):
        jax.block_until_ready(call(*ops, prologue=np.array([0, 0], np.int32),
                                   **{**attrs, "rotary_heads": np.array([0, 4], np.int32)}))
    with pytest.raises(Exception, match="takes 1 \\+ 6 n \\+ 5 r operands"):  # a rotary link without its 5
        jax.block_until_ready(call(*ops, prologue=np.array([0, 0], np.int32),
                                   **{**attrs, "epilogue": np.array([0, 2], np.int32)}))


@pytest.mark.gpu
def test_w4a4_decoded_handler_rejects_what_it_cannot_run(rng):
    """jaxfp4_gemm_w4a4_decoded: bad shapes or plain weights get an error, and nothing runs."""
    bd, bs, bg = random_nvfp4(rng, (), 32, 64, "linear")
    pd, ps = _pack(bd, bs, "linear")
    a = random_matrix(rng, (3, 64)).astype(BF16)

    def call(b_data, b_scales, packing, dec_k=64):
        f = jax.ffi.ffi_call("jaxfp4_gemm_w4a4_decoded", (jax.ShapeDtypeStruct((3, 32), BF16),
                                                          jax.ShapeDtypeStruct((3, dec_k), BF16),
                                                          jax.ShapeDtypeStruct((), np.float32)))
        out = f(_dev(a), _dev(np.float32(0.01)), _dev(b_data), _dev(b_scales.view(F8)),
                _dev(np.asarray(bg, np.float32).reshape(())), _dev(np.zeros((0,), BF16)),
                b_sf_layout=np.int32(fmt.SF_LAYOUT_IDS["linear"]), b_packing=np.int32(packing))
        return jax.block_until_ready(out)
    with pytest.raises(Exception, match="w4a4_decoded needs sm90-packed weights"):
        call(bd, bs, 0)
    with pytest.raises(Exception, match="a and decoded must be"):
        call(pd, ps, 1, dec_k=48)
    out, dec, g = call(pd, ps, 1)  # and the valid call runs
    assert np.isfinite(np.asarray(out, np.float32)).all() and float(g) == pytest.approx(0.01 * float(bg))
