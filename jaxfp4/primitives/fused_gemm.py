"""fused_gemm_p: out [M, N] = residual + prologue(a) @ B^T (jaxfp4.fused), W4A16
or W4A4 with a quantized from a static decode scale; or, with an epilogue,
out [M, N/2] = epilogue(prologue(a) @ B^T) (no residual).

Operands: (a [M, K_in], norm_weight [K] or [0], a_g [] or [0], b_data,
b_scales, b_g [], residual [M, N] or [0]): one batch entry, weights without
batch axes (ops.matmul folds a's leading axes into M). An empty operand is
unused: norm_weight without the rms_norm prologue, a_g for W4A16 (with a_g the
prologue's output is quantized as `quantize(prologue(a), a_g)`, then the W4A4
GEMM), residual when there is none. Params: prologue ("none", "rms_norm",
"swiglu"), eps, epilogue ("none", or an epilogue's kind: "swiglu_interleaved"),
quantize_a (whether a_g is given), a_sf_layout (W4A4: the layout the
composition quantizes into; the result does not depend on it; None for W4A16),
b_sf_layout, b_packing, b_shape (the logical (N, K)), out_dtype.

Kernel choice (cuda): `jaxfp4_gemm_fused` where `fused_fits` (bf16 a; W4A4
and prologues need sm90-packed weights and rows staged in shared memory, as
the in-kernel quantization's, W4A4 M <= 8; a prologue only for M <=
PROLOGUE_MAX_M); a prologue it cannot take runs in jnp before the fused op
with the residual or epilogue alone (`_prologue_then_fused`); W4A4 with a residual at
rows the fused kernel cannot quantize itself (gemm.quantize_decoded_fits)
is one call that quantizes and decodes, then stores the residual in the W4A16
kernel (gemm.w4a4_decoded, `_quantized_then_fused`); everywhere else the
composition `_compose`: the prologue in jnp, gemm_p (whatever kernel it
picks), the residual added by XLA. The two agree bit for bit in the residual add; the staged prologue values
may differ by one bf16 ulp (jaxfp4/fused.py), and W4A4 then quantizes them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jaxfp4 import format as fmt
from jaxfp4.fused import EPILOGUE_BY_KIND, RMSNorm, SwiGLU, add_residual
from jaxfp4.primitives import _common
from jaxfp4.primitives.gemm import (PACKING_IDS, SMALL_M_MAX, gemm_p, quantize_a_fits, quantize_decoded_fits,
                                    w4a4_decoded)

fused_gemm_p = _common.define("jaxfp4_fused_gemm")

# prologue name -> the FFI `prologue` attribute (csrc/cuda/sm90/gemm_staged_act.cuh).
PROLOGUE_IDS = {"none": 0, "rms_norm": 1, "swiglu": 2}
# epilogue name -> the FFI `epilogue` attribute (csrc/cuda/sm90/gemm_small_m_common.cuh).
# "rotary_kv_cache" is gemm_chain_p's rotary links' (jaxfp4.RotaryKVCache), not fused_gemm_p's.
EPILOGUE_IDS = {"none": 0, "swiglu_interleaved": 1, "rotary_kv_cache": 2}
# The most rows a fused prologue takes. Every CTA computes the prologue of all
# rows before its main loop, on the warps that then run it (the GEMM is
# instruction-bound at these M): in the 8B decode on an H200 it saved time at
# batch 1, was even at batch 2 and cost more than the separate XLA kernel at
# batch 4 (benchmarks/kernel/NOTES.md, session 11).
PROLOGUE_MAX_M = 1


def fused_fits(m: int, k: int, prologue: str, a_dtype, norm_dtype, out_dtype, has_residual: bool,
               b_packing, quantize_a: bool = False, epilogue: str = "none") -> bool:
    """Whether the CUDA kernels run this call (else the composition)."""
    bf16 = np.dtype(jnp.bfloat16)
    if np.dtype(a_dtype) != bf16 or (has_residual and np.dtype(out_dtype) != bf16):
        return False
    if epilogue != "none" and (has_residual or np.dtype(out_dtype) != bf16 or b_packing != "sm90"
                               or m > SMALL_M_MAX):
        return False  # the epilogue is in the packed kernel's bf16 store only
    if prologue == "none" and not quantize_a:  # the residual alone: any small-M W4A16 kernel stores it
        return m <= SMALL_M_MAX
    if prologue == "rms_norm" and np.dtype(norm_dtype) != bf16:
        return False
    if prologue != "none" and m > PROLOGUE_MAX_M:
        return False
    return quantize_a_fits(m, k, a_dtype, b_packing)  # the same staged rows


def native_fits(m: int, a_dtype, norm_dtype, has_residual: bool, params: dict) -> bool:
    """Whether fused_gemm_p with these params lowers to jaxfp4_gemm_fused on CUDA
    as it is (no prologue or quantization moved out into other ops)."""
    return fused_fits(m, params["b_shape"][1], params["prologue"], a_dtype, norm_dtype, params["out_dtype"],
                      has_residual, params["b_packing"], params["quantize_a"], params["epilogue"])


def out_features(params: dict) -> int:
    """The op's output columns: N, or what the epilogue makes of N."""
    n = params["b_shape"][0]
    return n if params["epilogue"] == "none" else EPILOGUE_BY_KIND[params["epilogue"]].out_features(n)


def _abstract_eval(a, norm_weight, a_g, b_data, b_scales, b_g, residual, **params):
    return [ShapedArray((a.shape[0], out_features(params)), np.dtype(params["out_dtype"]))]


def apply_prologue(a, norm_weight, prologue, eps):
    """A prologue param (and its norm weight, eps) applied in jnp (also gemm_chain's)."""
    if prologue == "rms_norm":
        return RMSNorm(norm_weight, eps)(a)
    if prologue == "swiglu":
        return SwiGLU()(a)
    return a


def _compose(a, norm_weight, a_g, b_data, b_scales, b_g, residual, *, prologue, eps, epilogue, quantize_a,
             a_sf_layout, b_sf_layout, b_packing, b_shape, out_dtype):
    """The unfused ops: prologue (jnp), the GEMM, the epilogue (jnp), the residual add."""
    x = apply_prologue(a, norm_weight, prologue, eps)
    b = dict(b_sf_layout=b_sf_layout, b_packing=b_packing, b_shape=b_shape, out_dtype=out_dtype)
    if quantize_a:
        (out,) = gemm_p.bind(x[None], a_g[None], b_data[None], b_scales[None], b_g[None], mode="w4a4_quantize_a",
                             a_sf_layout=a_sf_layout, **b)
    else:
        (out,) = gemm_p.bind(x[None], b_data[None], b_scales[None], b_g[None], mode="w4a16", a_sf_layout=None, **b)
    out = out[0]
    if epilogue != "none":
        out = EPILOGUE_BY_KIND[epilogue](out)
    return (add_residual(out, residual) if residual.size else out,)


def _prologue_then_fused(a, norm_weight, *rest, prologue, eps, **params):
    """The prologue in jnp, then the fused op with the residual alone."""
    x = apply_prologue(a, norm_weight, prologue, eps)
    return fused_gemm_p.bind(x, jnp.zeros((0,), a.dtype), *rest, prologue="none", eps=0.0, **params)


def _quantized_then_fused(a, norm_weight, a_g, b_data, b_scales, b_g, residual, *, prologue, eps, epilogue,
                          quantize_a, a_sf_layout, **params):
    """W4A4 + residual at rows the fused kernel cannot quantize itself: the prologue in jnp,
    then one call quantizing and decoding x exactly to bf16 and running the W4A16
    kernel with g_a * g_b, whose store adds the residual (gemm.w4a4_decoded, as
    gemm's route)."""
    x = apply_prologue(a, norm_weight, prologue, eps)
    return (w4a4_decoded(x, a_g, b_data, b_scales, b_g, residual, **params),)


def _choose(platform, avals_in, params):
    a, norm_weight, *_, residual = avals_in
    m = a.shape[0]
    fits = partial(native_fits, m, a.dtype, norm_weight.dtype, residual.size > 0)
    if platform == "cuda" and fits(params):
        return None
    if (platform == "cuda" and params["prologue"] != "none"
            and (residual.size > 0 or params["quantize_a"] or params["epilogue"] != "none")
            and fits({**params, "prologue": "none"})):
        return "prologue, then gemm + residual or epilogue (fused)", _prologue_then_fused
    if (platform == "cuda" and params["quantize_a"] and residual.size > 0 and quantize_decoded_fits(m, params["b_packing"])
            and np.dtype(params["out_dtype"]) == np.dtype(jnp.bfloat16) and params["epilogue"] == "none"):
        return "prologue, then w4a4_decoded: quantize (decoded) + w4a16 gemm + residual, one call", _quantized_then_fused
    return "prologue + gemm + residual (unfused)", _compose


def _native(platform, params):
    if platform != "cuda":
        return None
    return "jaxfp4_gemm_fused", {
        "prologue": _common.i32(PROLOGUE_IDS[params["prologue"]]),
        "eps": np.float32(params["eps"]),
        "epilogue": _common.i32(EPILOGUE_IDS[params["epilogue"]]),
        "b_sf_layout": _common.i32(fmt.SF_LAYOUT_IDS[params["b_sf_layout"]]),
        "b_packing": _common.i32(PACKING_IDS[params["b_packing"]])}


def _batch(args, dims, **params):
    a, norm_weight, a_g, b_data, b_scales, b_g, residual = args
    a_dim, *shared_dims, r_dim = dims
    if all(d is None for d in shared_dims):
        # Only the activations (and residual) are mapped: the entries are more rows.
        size = a.shape[a_dim] if a_dim is not None else residual.shape[r_dim]
        a = jnp.broadcast_to(_common.to_front(a, a_dim, size), (size, *a.shape[-2:]))
        if residual.size:
            residual = jnp.broadcast_to(_common.to_front(residual, r_dim, size), (size, *residual.shape[-2:]))
            residual = residual.reshape(-1, residual.shape[-1])
        rows = a.shape[1]
        (out,) = fused_gemm_p.bind(a.reshape(-1, a.shape[-1]), norm_weight, a_g, b_data, b_scales, b_g, residual,
                                   **params)
        return [out.reshape(size, rows, -1)], [0]
    # Per-entry weights, norms or scales: the composition, vmapped (gemm_p batches them).
    return jax.vmap(partial(_compose, **params), in_axes=tuple(dims))(*args), [0]


fused_gemm_p.def_abstract_eval(_abstract_eval)
_common.register_lowerings(fused_gemm_p, op="fused_gemm", native=_native, reference=_compose, choose=_choose)
_common.register_batcher(fused_gemm_p, _batch)
