"""gemm_p: out [*L, M, N] = A [*La, M, K] @ B [*Lb, N, K]^T with NVFP4 scaling.

Operands: mode "w4a4": (a_data, a_scales, a_g, b_data, b_scales, b_g);
mode "w4a16": (a, b_data, b_scales, b_g); mode "w4a4_quantize_a": (a, a_g,
b_data, b_scales, b_g), W4A4 with a [..., M, K] quantized with decode scale
a_g first (exactly quantize(a, a_g) then mode "w4a4"). Leading batch axes have
equal rank and broadcast (each dim equal or 1). Params: mode, a_sf_layout
(w4a4: a's; w4a4_quantize_a: the layout a is quantized into where that is a
separate step; None for w4a16), b_sf_layout, b_packing (None or a
jaxfp4.packing name), b_shape (the logical (N, K) of b), out_dtype.

Kernel choice (cuda): the small-M FFI kernel for M <= SMALL_M_MAX tokens;
beyond that, until a large-M kernel lands, XLA's bf16/f16 GEMM on exactly
dequantized operands (exact products, float32 accumulation: the same function).
w4a4_quantize_a runs as one kernel that quantizes a itself where
`quantize_a_in_gemm` (bf16 a, sm90-packed weights, M <= 8, a's rows in
QA_MAX_BYTES of shared memory, M x K <= QA_ONE_OP_MAX_ELEMS), else as below. W4A4 with sm90-packed
weights, one global scale per operand and A4_AS_A16_MIN_M..SMALL_M_MAX rows runs
as a decoded once, exactly, to bf16 (e2m1 x SF, no global scale) and the W4A16
kernel with g_a * g_b as the weights' global scale: the same products and
float32 sums as the W4A4 kernel's, which decodes every activation code again
for every weight tile it multiplies. a is decoded by XLA when it comes
quantized (mode w4a4); w4a4_quantize_a that the GEMM kernel cannot quantize
itself runs, at any M <= SMALL_M_MAX, as one call (w4a4_decoded) of the
quantize_decoded kernel (the decode and g_a * g_b in the launch that quantizes
a) and the W4A16 kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jaxfp4 import format as fmt
from jaxfp4 import packing, reference
from jaxfp4.primitives import _common
from jaxfp4.primitives.quantize import quantize_p

gemm_p = _common.define("jaxfp4_gemm")

SMALL_M_MAX = 32  # the small-M kernel's design point (decode batch sizes)
# b_packing name -> the FFI `b_packing` attribute (csrc/README.md).
PACKING_IDS = {None: 0, "sm90": packing.PACKING_SM90}


# In-kernel activation quantization (csrc/cuda/sm90/gemm_small_m_packed.cuh,
# kQaMaxBytes and qa_row_bytes): min(M, 8) rows of K (rounded up to 64) bf16
# plus 16 bytes each, in at most this much shared memory.
QA_MAX_BYTES = 80 * 1024
QA_MAX_M = 8
# From this many rows (the kernels' two-token-tile instantiations) the W4A16
# kernel on a decoded once beats the W4A4 kernel by more than the decode's
# extra XLA kernel costs (benchmarks/kernel/NOTES.md, session 12).
A4_AS_A16_MIN_M = 9
_N_A = {"w4a4": 3, "w4a16": 1, "w4a4_quantize_a": 2}  # operands of the activation group


def _split(args, mode):
    return args[:_N_A[mode]], args[_N_A[mode]:]


# The one-op W4A4 (input_scale, no prologue) quantizes in the GEMM kernel only
# up to this many elements M x K: that prologue runs on every CTA, so its cost
# grows with M x K (H100 protocol: +0.5 us over W4A16 at 1 x 4096, +3.1 at
# 1 x 14336, +3.3 at 8 x 4096), while quantize_decoded + the W4A16 kernel costs
# ~1.5-2 us at any M <= 32 (benchmarks/kernel/NOTES.md, session 13).
QA_ONE_OP_MAX_ELEMS = 8192


def quantize_a_in_gemm(m: int, k: int, a_dtype, b_packing) -> bool:
    """Whether the one-op W4A4 of [M, K] activations runs as the GEMM kernel that
    quantizes them itself (else quantize_decoded + W4A16, or quantize + W4A4)."""
    return quantize_a_fits(m, k, a_dtype, b_packing) and m * k <= QA_ONE_OP_MAX_ELEMS


def quantize_a_fits(m: int, k: int, a_dtype, b_packing) -> bool:
    """Whether the CUDA kernel quantizes activations [M, K] of a_dtype itself."""
    row = -(-k // 64) * 64 * 2 + 16
    return (b_packing == "sm90" and np.dtype(a_dtype) == np.dtype(jnp.bfloat16) and m <= QA_MAX_M
            and min(m, QA_MAX_M) * row <= QA_MAX_BYTES)


def _abstract_eval(*args, mode, a_sf_layout, b_sf_layout, b_packing, b_shape, out_dtype):
    a_group, (_, _, b_g) = _split(args, mode)
    a_lead = a_group[2].shape if mode == "w4a4" else a_group[0].shape[:-2]
    m = a_group[0].shape[-2]
    lead = _common.broadcast_batch(a_lead, b_g.shape)
    return [ShapedArray((*lead, m, b_shape[0]), np.dtype(out_dtype))]


def _plain_b(b_data, b_scales, *, b_packing, b_shape, b_sf_layout):
    if b_packing is None:
        return b_data, b_scales
    return packing.unpack_weights(b_data, b_scales, b_shape[0], b_shape[1], b_sf_layout)


def _quantize_then_gemm(a, a_g, *b_group, **params):
    """w4a4_quantize_a as two ops: quantize a (a_sf_layout), then the w4a4 GEMM."""
    data, scales = quantize_p.bind(a, a_g, sf_layout=params["a_sf_layout"], dynamic=False)
    return gemm_p.bind(data, scales, a_g, *b_group, **{**params, "mode": "w4a4"})


def _quantize_decoded_then_gemm(a, a_g, b_data, b_scales, b_g, **params):
    """w4a4_quantize_a at the rows W4A4 runs on decoded activations (one g_a, one
    g_b: every batch axis has size 1): quantize_decoded then the W4A16 kernel with
    g_a * g_b, in one call (w4a4_decoded): the products and float32 sums of
    quantize then the W4A4 kernel, without the codes' round trip through memory,
    an XLA decode and an XLA multiply (each a kernel of its own)."""
    lead = np.broadcast_shapes(a.shape[:-2], b_g.shape)
    out = w4a4_decoded(a.reshape(a.shape[-2:]), a_g, b_data, b_scales, b_g, None, **params)
    return (out.reshape(*lead, *out.shape),)


def w4a4_decoded(a, a_g, b_data, b_scales, b_g, residual, *, b_sf_layout, b_packing, b_shape, out_dtype,
                 **_):
    """residual + quantize(a [M, K], a_g) @ B^T (W4A4 from float a, one a_g and one
    b_g, sm90-packed weights) as jaxfp4_gemm_w4a4_decoded (CUDA): one call
    launching quantize_decoded (a's quantized values, exact in bf16, and a_g *
    b_g) and the W4A16 kernel on them, whose weight copies start while the
    quantize runs. Its other two results are its scratch."""
    m, k = a.shape
    call = jax.ffi.ffi_call("jaxfp4_gemm_w4a4_decoded", (
        jax.ShapeDtypeStruct((m, b_shape[0]), out_dtype), jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.float32)))
    out, _, _ = call(a, a_g.reshape(()), b_data.reshape(b_data.shape[-2:]), b_scales.reshape(b_scales.shape[-2:]),
                     b_g.reshape(()), jnp.zeros((0,), jnp.bfloat16) if residual is None else residual,
                     b_sf_layout=_common.i32(fmt.SF_LAYOUT_IDS[b_sf_layout]),
                     b_packing=_common.i32(PACKING_IDS[b_packing]))
    return out


def _reference(*args, mode, a_sf_layout, b_sf_layout, b_packing, b_shape, out_dtype):
    if mode == "w4a4_quantize_a":
        a, a_g, *b_group = args
        data, scales, _ = reference.quantize(a, a_g, sf_layout=a_sf_layout)
        args = (data, scales, a_g, *b_group)
        mode = "w4a4"
    a_group, (b_data, b_scales, b_g) = _split(args, mode)
    b_data, b_scales = _plain_b(b_data, b_scales, b_packing=b_packing, b_shape=b_shape,
                                b_sf_layout=b_sf_layout)
    if mode == "w4a4":
        out = reference.gemm_w4a4(*a_group, b_data, b_scales, b_g, a_sf_layout=a_sf_layout,
                                  b_sf_layout=b_sf_layout, out_dtype=out_dtype)
    else:
        out = reference.gemm_w4a16(a_group[0], b_data, b_scales, b_g, b_sf_layout=b_sf_layout,
                                   out_dtype=out_dtype)
    return (out,)


def _xla_dequant_dot(*args, mode, a_sf_layout, b_sf_layout, b_packing, b_shape, out_dtype):
    """The spec's GEMM through XLA's tensor-core GEMM: operands dequantized to
    bf16 (or the activations' f16) exactly, float32 accumulation."""
    a_group, (b_data, b_scales, b_g) = _split(args, mode)
    b_data, b_scales = _plain_b(b_data, b_scales, b_packing=b_packing, b_shape=b_shape,
                                b_sf_layout=b_sf_layout)
    if mode == "w4a4":
        a_data, a_scales, a_g = a_group
        dt = jnp.bfloat16
        a = reference.dequantize_unscaled(a_data, a_scales, a_sf_layout).astype(dt)
        g = a_g.astype(jnp.float32) * b_g
    else:
        a, g, dt = a_group[0], b_g, a_group[0].dtype
    w = reference.dequantize_unscaled(b_data, b_scales, b_sf_layout).astype(dt)
    acc = jnp.matmul(a, jnp.swapaxes(w, -1, -2), preferred_element_type=jnp.float32)
    return ((g[..., None, None] * acc).astype(out_dtype),)


def a4_as_a16_fits(m: int, b_packing) -> bool:
    """Whether CUDA runs a W4A4 product of m quantized rows as decoded activations
    (an XLA decode) + the W4A16 kernel."""
    return b_packing == "sm90" and A4_AS_A16_MIN_M <= m <= SMALL_M_MAX


def quantize_decoded_fits(m: int, b_packing) -> bool:
    """Whether CUDA runs a W4A4 product of m float rows it quantizes itself, where
    the GEMM kernel does not (quantize_a_in_gemm), as quantize_decoded + the W4A16
    kernel: at any M the decode rides in the quantize launch, and the W4A16
    kernel is the faster of the two (the W4A4 kernel decodes activation codes again
    for every weight tile)."""
    return b_packing == "sm90" and m <= SMALL_M_MAX


def _a4_as_a16(a_data, a_scales, a_g, b_data, b_scales, b_g, *, a_sf_layout, **params):
    """W4A4 as the W4A16 kernel on a's exact values: e2m1 x SF is exact in bf16
    (at most 6 significant bits, 2^-10 .. 2688), and g_a * g_b is the float32
    product the W4A4 kernel and the reference scale by."""
    a = reference.dequantize_unscaled(a_data, a_scales, a_sf_layout).astype(jnp.bfloat16)
    g = a_g.astype(jnp.float32) * b_g.astype(jnp.float32)
    return gemm_p.bind(a, b_data, b_scales, g, **{**params, "mode": "w4a16", "a_sf_layout": None})


def _a4_as_a16_applies(avals_in, params) -> bool:
    """W4A4 (mode w4a4 or w4a4_quantize_a) runs as decoded activations + the W4A16 kernel."""
    mode, m, a_g, b_g = params["mode"], avals_in[0].shape[-2], avals_in[_N_A[params["mode"]] - 1], avals_in[-1]
    fits = {"w4a4": a4_as_a16_fits, "w4a4_quantize_a": quantize_decoded_fits}.get(mode)
    return fits is not None and fits(m, params["b_packing"]) and a_g.size == 1 and b_g.size == 1


def _unpack_then_gemm(*args, **params):
    """Pre-packed weights on a platform whose handler takes plain ones."""
    n_a = _N_A[params["mode"]]
    b_data, b_scales = _plain_b(*args[n_a:n_a + 2], b_packing=params["b_packing"],
                                b_shape=params["b_shape"], b_sf_layout=params["b_sf_layout"])
    return gemm_p.bind(*args[:n_a], b_data, b_scales, args[-1], **{**params, "b_packing": None})


def _choose(platform, avals_in, params):
    if params["mode"] == "w4a4_quantize_a":
        m, k = avals_in[0].shape[-2:]
        if platform == "cuda" and quantize_a_in_gemm(m, k, avals_in[0].dtype, params["b_packing"]):
            return None
        if platform == "cuda" and _a4_as_a16_applies(avals_in, params):
            return "w4a4_decoded: quantize (decoded) + w4a16 (W4A4), one call", _quantize_decoded_then_gemm
        return "quantize + gemm", _quantize_then_gemm
    if platform != "cuda":
        return ("unpack + gemm", _unpack_then_gemm) if params["b_packing"] is not None else None
    m = avals_in[0].shape[-2]
    if params["mode"] == "w4a16" and avals_in[0].dtype == np.float32:
        return "reference (float32 activations)", _reference
    if m > SMALL_M_MAX:
        return "xla_dequant_dot (M > %d)" % SMALL_M_MAX, _xla_dequant_dot
    if _a4_as_a16_applies(avals_in, params):
        return "a decoded + w4a16 (W4A4, M >= %d)" % A4_AS_A16_MIN_M, _a4_as_a16
    return None


def _native(platform, params):
    attrs = {"b_sf_layout": _common.i32(fmt.SF_LAYOUT_IDS[params["b_sf_layout"]]),
             "b_packing": _common.i32(PACKING_IDS[params["b_packing"]])}
    if params["mode"] == "w4a4":
        attrs["a_sf_layout"] = _common.i32(fmt.SF_LAYOUT_IDS[params["a_sf_layout"]])
        return "jaxfp4_gemm_w4a4", attrs
    if params["mode"] == "w4a4_quantize_a":
        return "jaxfp4_gemm_w4a4_quantize_a", attrs
    return "jaxfp4_gemm_w4a16", attrs


def _batch(args, dims, **params):
    size = _common.batch_size(args, dims)
    n_a = _N_A[params["mode"]]
    a = _common.batch_group(args[:n_a], dims[:n_a], size)
    b = _common.batch_group(args[n_a:], dims[n_a:], size)
    return gemm_p.bind(*a, *b, **params), [0]


gemm_p.def_abstract_eval(_abstract_eval)
_common.register_lowerings(gemm_p, op="gemm", native=_native, reference=_reference, choose=_choose)
_common.register_batcher(gemm_p, _batch)
