"""The SwiGLU epilogue in the packed kernel's store (jaxfp4_gemm_fused and
jaxfp4_gemm_chain with epilogue 1, csrc/cuda/sm90/gemm_small_m_common.cuh
store_swiglu) on the GPU.

Every case runs on fresh random operands into NaN-poisoned memory (an output
the kernel does not write stays NaN and fails). The reference is the same
kernel's product without the epilogue (the same sums, so the same bf16 gate
and up values) de-interleaved, then silu(gate) * up in float64 rounded once to
bf16: the kernel's float32 __expf / __fdividef may land one bf16 ulp away near
a rounding tie, as the staged SwiGLU prologue's (test_gpu_fused.py), and below
gate = -87 (exp(-gate) overflows float32, as in jnp's float32 SwiGLU) it may
give +-0 where the exact value is a tiny bf16 number."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
from jaxfp4.fused import GATE_UP_BLOCK

from data import random_matrix
from test_gpu_fused import EPS, _poison, ffi_fused
from test_gpu_gemm import random_nvfp4

BF16 = ml_dtypes.bfloat16
SWIGLU = jaxfp4.InterleavedSwiGLU()


def _gate_up(rng, n_gate, k):
    w = jaxfp4.quantize(jnp.asarray(random_matrix(rng, (2 * n_gate, k), spread=2)), sf_layout="linear")
    gate, up = (jaxfp4.NVFP4Tensor(w.data[s], w.scales[s], w.global_scale, "linear")
                for s in (slice(0, n_gate), slice(n_gate, None)))
    return jaxfp4.prepare_weights(jaxfp4.interleave_gate_up(gate, up))


def swiglu_of_product(product):
    """silu(gate) * up of an interleaved bf16 product, float64, rounded once to bf16."""
    y = np.asarray(product, np.float64)
    m, n = y.shape
    blocks = y.reshape(m, n // (2 * GATE_UP_BLOCK), 2, GATE_UP_BLOCK)
    g, u = blocks[:, :, 0].reshape(m, n // 2), blocks[:, :, 1].reshape(m, n // 2)
    with np.errstate(over="ignore"):
        return (g / (1 + np.exp(-g)) * u).astype(BF16).astype(np.float32)


def assert_swiglu_close(got, product):
    got, want = np.asarray(got, np.float32), swiglu_of_product(product)
    assert got.shape == want.shape and np.isfinite(got).all()
    # Where float32's exp(-gate) overflows (gate < -88.7; the approximation may give up
    # a little earlier) the kernel's +-0 or the exact value both pass.
    y = np.asarray(product, np.float32)
    gate = y.reshape(y.shape[0], -1, 2, GATE_UP_BLOCK)[:, :, 0].reshape(want.shape)
    under = gate < -87
    assert (np.abs(got - want) <= np.abs(want))[under].all()
    np.testing.assert_allclose(got[~under], want[~under], rtol=2.0 ** -7, atol=0)
    # Last-bit flips (float32 with fast exp against float64, each rounded to bf16) are
    # rare: at most 0.5% of the outputs, or 2 where there are few (M = 1: 200 outputs,
    # where one flip was 0.53%; seed 878793525).
    flips = np.count_nonzero(got[~under] != want[~under])
    assert flips <= max(2, 0.005 * got[~under].size), f"{flips} last-bit differences"


def _run(fn, *args):
    """fn jitted, lowered first (so the path is recorded), run into poisoned memory."""
    f = jax.jit(fn)
    f.lower(*args)
    _poison()
    return f(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("m", range(1, 34))
def test_every_m(rng, m):
    """M = 1..33 (32 is the kernel's last; 33 the composition), N_gate = 200, K = 272."""
    w = _gate_up(rng, 200, 272)
    x = jnp.asarray(random_matrix(rng, (m, 272), spread=3), jnp.bfloat16)
    got = _run(lambda x: jaxfp4.matmul(x, w, epilogue=SWIGLU), x)
    info = jaxfp4.backend_info()
    path = info["lowered"]["fused_gemm[cuda]"]
    assert path == "jaxfp4_gemm_fused" if m <= 32 else path.startswith("prologue + gemm")
    if m <= 32:
        assert info["kernels_run"]["gemm"] == f"sm90_gemm_small_m_w4a16_bf16_n{8 if m <= 8 else 16 if m <= 16 else 32}" \
            "_packed_swiglu_out"
    assert_swiglu_close(got, jaxfp4.matmul(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n_gate,k", [(1, 14336, 4096), (4, 14336, 4096), (16, 1000, 4096), (3, 8, 16),
                                        (9, 24, 48), (32, 520, 208)])
def test_shapes(rng, m, n_gate, k):
    """The 8B gate_up and ragged N and K (N not a multiple of 128; K = 16, 48, 208)."""
    w = _gate_up(rng, n_gate, k)
    x = jnp.asarray(random_matrix(rng, (m, k), spread=3), jnp.bfloat16)
    assert_swiglu_close(_run(lambda x: jaxfp4.matmul(x, w, epilogue=SWIGLU), x), jaxfp4.matmul(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 8])
def test_with_rms_norm_and_w4a4(rng, m):
    """With the RMSNorm prologue at M = 1 (staged rows), and W4A4 (in-kernel quantization)."""
    k = 4096
    w = _gate_up(rng, 1000, k)
    x = jnp.asarray(random_matrix(rng, (m, k), spread=3), jnp.bfloat16)
    if m == 1:
        norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(k), jnp.bfloat16), EPS)
        got = _run(lambda x: jaxfp4.matmul(x, w, prologue=norm, epilogue=SWIGLU), x)
        kernel = jaxfp4.backend_info()["kernels_run"]["gemm"]
        assert kernel == "sm90_gemm_small_m_w4a16_bf16_n8_packed_staged_swiglu_out"
        assert_swiglu_close(got, jaxfp4.matmul(x, w, prologue=norm))
    g_a = jnp.float32(np.abs(np.asarray(x, np.float32)).max() / 2688)
    got = _run(lambda x: jaxfp4.matmul(x, w, input_scale=g_a, epilogue=SWIGLU), x)
    assert jaxfp4.backend_info()["lowered"]["fused_gemm[cuda]"] == "jaxfp4_gemm_fused"
    assert_swiglu_close(got, jaxfp4.matmul(x, w, input_scale=g_a))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_chain_decoder_mlp(rng, m):
    """o_proj + residual, gate_up with the RMSNorm and the SwiGLU epilogue, down + link 0's
    output: one jaxfp4_gemm_chain call (at M = 1; the norm runs in XLA above), bit for bit
    its links' own calls."""
    d, f = 4096, 14336
    x = jnp.asarray(random_matrix(rng, (m, d), spread=3), jnp.bfloat16)
    attn = jnp.asarray(random_matrix(rng, (m, d), spread=3), jnp.bfloat16)
    norm = jaxfp4.RMSNorm(jnp.asarray(0.5 + rng.random(d), jnp.bfloat16), EPS)
    prep = lambda n, k: jaxfp4.prepare_weights(jaxfp4.quantize(  # noqa: E731
        jnp.asarray(random_matrix(rng, (n, k), spread=2)), sf_layout="linear"))
    links = [jaxfp4.Link(prep(d, d), residual=x),
             jaxfp4.Link(_gate_up(rng, f, d), prologue=norm, epilogue=SWIGLU),
             jaxfp4.Link(prep(d, f), residual=0)]
    got = _run(lambda a: jaxfp4.matmul_chain(a, links), attn)
    if m == 1:
        assert jaxfp4.backend_info()["lowered"]["gemm_chain[cuda]"] == "jaxfp4_gemm_chain"
    h = jaxfp4.matmul(attn, links[0].weight, residual=x)
    act = jaxfp4.matmul(h, links[1].weight, prologue=norm, epilogue=SWIGLU)
    want = [h, act, jaxfp4.matmul(act, links[2].weight, residual=h)]
    for i, (y, w) in enumerate(zip(got, want)):
        y, w = np.asarray(y, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(y).all() and np.abs(y).max() > 0, f"link {i}"
        np.testing.assert_array_equal(y, w, err_msg=f"link {i}")


@pytest.mark.gpu
def test_handler_rejects_what_it_cannot_run(rng):
    """Calls the Python side never makes get an error naming the rule."""
    bd, bs, bg = random_nvfp4(rng, (), 32, 64, "linear")
    a = random_matrix(rng, (2, 64)).astype(BF16)
    with pytest.raises(Exception, match="the swiglu epilogue needs sm90-packed weights"):
        ffi_fused(a, None, bd, bs, bg, None, 16, prologue="none", layout="linear", packed=False, epilogue=1)
    with pytest.raises(Exception, match="the swiglu epilogue takes no residual"):
        ffi_fused(a, None, bd, bs, bg, np.zeros((2, 16), BF16), 16, prologue="none", layout="linear", epilogue=1)
    with pytest.raises(Exception, match="out must be BF16 with the swiglu epilogue"):
        ffi_fused(a, None, bd, bs, bg, None, 16, prologue="none", layout="linear", epilogue=1, out_dtype=np.float32)
    bd, bs, bg = random_nvfp4(rng, (), 24, 64, "linear")
    with pytest.raises(Exception, match="the swiglu epilogue needs N % 16 == 0"):
        ffi_fused(a, None, bd, bs, bg, None, 12, prologue="none", layout="linear", epilogue=1)
    with pytest.raises(Exception, match="epilogue must be 0, 1 or 2"):
        ffi_fused(a, None, bd, bs, bg, None, 24, prologue="none", layout="linear", epilogue=3)
    with pytest.raises(Exception, match="runs as a jaxfp4_gemm_chain link"):
        ffi_fused(a, None, bd, bs, bg, None, 24, prologue="none", layout="linear", epilogue=2)
