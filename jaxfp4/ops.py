"""The public ops: argument checks (at trace time, naming the argument and the
rule), then the primitives. One obvious function per operation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4 import format as fmt
from jaxfp4 import packing as packing_mod
from jaxfp4._checks import check_float_dtype as _check_float_dtype
from jaxfp4._checks import check_k
from jaxfp4 import reference
from jaxfp4.fused import (EPILOGUES, GATE_UP_BLOCK, PROLOGUES, Epilogue, Prologue, RMSNorm, RotaryKVCache,
                          add_residual)
from jaxfp4.primitives.dequantize import dequantize_p
from jaxfp4.primitives.fused_gemm import fused_gemm_p
from jaxfp4.primitives.gemm import PACKING_IDS, SMALL_M_MAX, gemm_p
from jaxfp4.primitives.quantize import quantize_p
from jaxfp4.tensor import NVFP4Tensor, describe

def _check_matrix(x: Any, arg: str, what: str) -> jax.Array:
    """x as a jax array with ndim >= 2 and a float dtype (float32/bfloat16/float16; numpy input
    is canonicalized like jnp does: float64 becomes float32 unless x64 is on)."""
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{arg} must be an array {what}, got {type(x).__name__}")
    _check_float_dtype(x.dtype, f"{arg}.dtype")
    if x.ndim < 2:
        raise ValueError(f"{arg} must have rank >= 2 ({what}), got shape {tuple(x.shape)}")
    return x


def _global_scale(global_scale: Any, lead: tuple[int, ...], arg: str = "global_scale") -> jax.Array:
    g = jnp.asarray(global_scale)
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"{arg} must be a float32 scalar (the decode scale g), got dtype {g.dtype}")
    try:
        shape = np.broadcast_shapes(g.shape, lead)
    except ValueError:
        shape = None
    if shape != tuple(lead):
        raise ValueError(f"{arg} must be a scalar or have the leading batch shape {lead} "
                         f"(one decode scale per batch entry), got shape {g.shape}")
    return jnp.broadcast_to(g.astype(jnp.float32), lead)


def _check_tensor(t: Any, arg: str) -> NVFP4Tensor:
    if not isinstance(t, NVFP4Tensor):
        raise TypeError(f"{arg} must be an NVFP4Tensor (see jaxfp4.quantize), got {describe(t)}")
    return t


# ---- quantize / dequantize -----------------------------------------------------

def quantize(x: jax.Array, global_scale: Any = None, *, sf_layout: str = "128x4") -> NVFP4Tensor:
    """Quantizes x [..., M, K] (float32/bfloat16/float16, K % 16 == 0) to NVFP4.

    Args:
      x: the values; blocks of 16 run along the last axis.
      global_scale: the decode scale g (x ~= e2m1 * SF * g), a float32 scalar or
        one per leading batch entry; None computes g = amax / (6 * 448) from the
        finite amax per batch entry.
      sf_layout: layout of the block scales: "128x4" (CUTLASS/cuBLASLt), "8x4"
        (the small-batch layout: 8-row padding instead of 128) or "linear".
    """
    x = _check_matrix(x, "x", "[..., M, K]")
    check_k(x.shape[-1], "x")
    fmt.check_sf_layout(sf_layout)
    lead = tuple(x.shape[:-2])
    if global_scale is None:
        data, scales, g = quantize_p.bind(x, sf_layout=sf_layout, dynamic=True)
    else:
        g = _global_scale(global_scale, lead)
        data, scales = quantize_p.bind(x, g, sf_layout=sf_layout, dynamic=False)
    return NVFP4Tensor(data, scales, g, sf_layout)


def dequantize(t: NVFP4Tensor, dtype: Any = jnp.float32) -> jax.Array:
    """x_hat = e2m1(q) * SF * g computed in float32, returned as `dtype`."""
    t = _plain(_check_tensor(t, "t"))
    dt = _check_float_dtype(dtype, "dtype")
    (out,) = dequantize_p.bind(t.data, t.scales, t.global_scale, sf_layout=t.sf_layout, dtype=dt)
    return out


# ---- GEMM ----------------------------------------------------------------------

def matmul(a: NVFP4Tensor | jax.Array, b: NVFP4Tensor, *, input_scale: Any = None,
           input_sf_layout: str | None = None, out_dtype: Any = jnp.bfloat16,
           prologue: Prologue | None = None, residual: jax.Array | None = None,
           epilogue: Epilogue | None = None) -> Any:
    """a @ b.T with NVFP4 weights b [..., N, K] (K-major, the checkpoint orientation).

    a is an NVFP4Tensor [..., M, K] (W4A4: both operands 4-bit) or a
    bfloat16/float16/float32 array [..., M, K]: weight-only (W4A16), or with
    `input_scale` W4A4 with a quantized first, exactly as
    `matmul(quantize(a, input_scale), b)` (on the GPU one kernel for decode-size
    M with prepared weights: no separate quantize launch). Leading batch axes
    broadcast (numpy rules). Returns [..., M, N] in `out_dtype`, accumulated in
    float32 (nvfp4-spec.md section 4).

    Args:
      input_scale: a's static decode scale g_a (float32 scalar or one per
        leading batch entry of a), e.g. a checkpoint's calibrated input scale.
      input_sf_layout: with input_scale, the scale layout a is quantized into
        where quantization runs as its own step (the result does not depend on
        it); default "8x4" for at most 32 rows, else "128x4".
      prologue: `jaxfp4.RMSNorm(weight, eps)` or `jaxfp4.SwiGLU()`, applied to
        a float a first (SwiGLU: a is [..., M, 2K]); see jaxfp4.fused. On the
        GPU, W4A16 with bf16 a, prepared weights and M <= 8 runs it inside the
        GEMM kernel (no separate norm or activation kernel).
      residual: [..., M, N] in out_dtype, added to the product (rounded as
        `residual + matmul(...)`); fused into the W4A16 kernel's store on the
        GPU for bf16 and M <= 32.
      epilogue: `jaxfp4.InterleavedSwiGLU()`: silu(gate) * up of the output
        [..., M, N], whose gate and up columns alternate in blocks of 8 (a
        weight from `jaxfp4.interleave_gate_up`); returns [..., M, N/2]. On
        the GPU, bf16 out with prepared weights and M <= 32 computes it in the
        GEMM's store. Not together with a residual.
        `jaxfp4.RotaryKVCache(...)` (a weight from `jaxfp4.interleave_rotary`):
        RoPE on the q and k heads and the k and v heads written into the KV
        cache; returns (q [..., M, heads * head_dim], k_cache, v_cache). On the
        GPU (bf16, prepared weights, M <= 32) in the GEMM's store too.
    """
    b = _check_tensor(b, "b")
    out_dt = _check_float_dtype(out_dtype, "out_dtype")
    if b.ndim < 2:
        raise ValueError(f"b must have rank >= 2 ([..., N, K]), got {describe(b)}")
    n, k = b.shape[-2:]
    w4a4 = isinstance(a, NVFP4Tensor)
    if prologue is not None or residual is not None or epilogue is not None:
        return _matmul_fused(a, b, prologue, residual, epilogue, input_scale=input_scale,
                             input_sf_layout=input_sf_layout, out_dtype=out_dt)
    if input_scale is not None and w4a4:
        raise ValueError("input_scale quantizes a float a: a is already an NVFP4Tensor (drop input_scale)")
    if input_sf_layout is not None:
        if input_scale is None:
            raise ValueError("input_sf_layout is the layout a is quantized into: it needs input_scale")
        fmt.check_sf_layout(input_sf_layout, "input_sf_layout")
    if w4a4:
        if a.packing is not None:
            raise ValueError("a must not be pre-packed: prepare_weights is for the weight operand b")
        fmt.check_sf_layout(a.sf_layout, "a.sf_layout")
    else:
        a = _check_matrix(a, "a", "[..., M, K] activations, or an NVFP4Tensor")
    ka = a.shape[-1]
    if ka != k:
        raise ValueError(f"a and b must share K: a is {describe(a)} (K={ka}), b is {describe(b)} (K={k})")
    a_lead, b_lead = tuple(a.shape[:-2]), tuple(b.shape[:-2])
    try:
        lead = np.broadcast_shapes(a_lead, b_lead)
    except ValueError:
        raise ValueError(f"the leading batch axes of a {a_lead} and b {b_lead} do not broadcast") from None
    m = a.shape[-2]

    params = dict(b_sf_layout=b.sf_layout, b_packing=b.packing, b_shape=(n, k), out_dtype=out_dt)
    if input_scale is not None:
        one_g = np.ndim(input_scale) == 0  # one decode scale for every batch entry of a
        g_a = _global_scale(input_scale, () if one_g else a_lead, "input_scale")
        return _matmul_quantize_a(a, b, g_a, input_sf_layout, lead, params)
    if not w4a4 and not any(d != 1 for d in b_lead):
        # Shared weights: fold a's batch axes into M so the weights stream once.
        (out,) = gemm_p.bind(a.reshape(1, -1, k), *_with_rank(b, 1), mode="w4a16",
                             a_sf_layout=None, **params)
        return out.reshape(*lead, m, n)
    rank = len(lead)
    b_ops = _with_rank(b, rank)
    if w4a4:
        (out,) = gemm_p.bind(*_with_rank(a, rank), *b_ops, mode="w4a4", a_sf_layout=a.sf_layout, **params)
    else:
        a2 = a.reshape((1,) * (rank - len(a_lead)) + a.shape)
        (out,) = gemm_p.bind(a2, *b_ops, mode="w4a16", a_sf_layout=None, **params)
    return out


def _matmul_quantize_a(a: jax.Array, b: NVFP4Tensor, g_a: jax.Array, layout: str | None,
                       lead: tuple[int, ...], params: dict) -> jax.Array:
    """W4A4 from float activations a [..., M, K] and their decode scale g_a: a scalar
    (one for every batch entry) or [...]; `layout` as matmul's input_sf_layout."""
    *a_lead, m, k = a.shape
    if g_a.ndim == 0 and not any(d != 1 for d in b.shape[:-2]):
        # Shared weights, one g_a: a's batch axes fold into M (the weights stream once).
        rows = int(np.prod(a_lead, dtype=np.int64)) * m
        layout = layout or fmt.activation_sf_layout(rows, SMALL_M_MAX)
        (out,) = gemm_p.bind(a.reshape(1, rows, k), g_a.reshape(1), *_with_rank(b, 1), mode="w4a4_quantize_a",
                             a_sf_layout=layout, **params)
        return out.reshape(*lead, m, params["b_shape"][0])
    g_a = jnp.broadcast_to(g_a, tuple(a_lead))
    rank = len(lead)
    grow = (1,) * (rank - len(a_lead))
    (out,) = gemm_p.bind(a.reshape(grow + a.shape), g_a.reshape(grow + g_a.shape), *_with_rank(b, rank),
                         mode="w4a4_quantize_a", a_sf_layout=layout or fmt.activation_sf_layout(m, SMALL_M_MAX),
                         **params)
    return out


def _matmul_fused(a: Any, b: NVFP4Tensor, prologue: Prologue | None, residual: Any, epilogue: Epilogue | None,
                  **kw: Any) -> jax.Array:
    """matmul with a prologue, a residual and/or an epilogue (checked here,
    naming the rule): float a with weights shared by every batch entry (W4A16,
    or W4A4 from one input_scale) is the fused primitive; anything else the same
    steps as separate ops."""
    f = fused_operands(a, b, prologue, residual, epilogue=epilogue, **kw)
    if f is not None and isinstance(epilogue, RotaryKVCache):  # an op with arrays of its own: a one-link chain
        from jaxfp4.chain import Link, matmul_chain  # (chain imports this module)
        link = Link(b, prologue=prologue, input_scale=kw["input_scale"], epilogue=epilogue)
        return matmul_chain(a, [link], out_dtype=kw["out_dtype"])[0]
    if f is None:
        y = matmul(prologue(a) if prologue is not None else a, b, **kw)
        y = y if epilogue is None else epilogue(y)
        return y if residual is None else add_residual(y, residual)
    a2 = jnp.broadcast_to(a, (*f.lead, f.m, f.k_in)).reshape(f.rows, f.k_in)
    res = residual.reshape(f.rows, f.n) if residual is not None else jnp.zeros((0,), f.params["out_dtype"])
    (out,) = fused_gemm_p.bind(a2, *f.operands, res, **f.params)
    return out.reshape(*f.lead, f.m, f.n)


class FusedCall(NamedTuple):
    """What fused_gemm_p needs for one matmul besides a and the residual."""
    operands: tuple[jax.Array, ...]  # norm_weight, a_g, b_data, b_scales, b_g
    params: dict[str, Any]
    lead: tuple[int, ...]
    m: int
    n: int  # the output's columns (N, or the epilogue's N_out)
    k_in: int

    @property
    def rows(self) -> int:
        return int(np.prod(self.lead, dtype=np.int64)) * self.m


def fused_operands(a: Any, b: NVFP4Tensor, prologue: Prologue | None, residual: Any, *, input_scale: Any,
                   input_sf_layout: str | None, out_dtype: Any, epilogue: Epilogue | None = None) -> FusedCall | None:
    """Checks matmul's arguments with a prologue, a residual and/or an epilogue
    (naming the rule); a and residual may be anything with a shape and dtype
    (e.g. a jax.ShapeDtypeStruct). Returns fused_gemm_p's operands and params
    where the fused primitive applies (float a, weights shared by every batch
    entry, one input_scale at most), else None (separate ops)."""
    n_gemm, k = b.shape[-2:]
    n = n_gemm
    if epilogue is not None:
        if not isinstance(epilogue, EPILOGUES):
            raise TypeError(f"epilogue must be jaxfp4.InterleavedSwiGLU(), jaxfp4.RotaryKVCache or None, "
                            f"got {type(epilogue).__name__}")
        epilogue.check(n_gemm)
        if residual is not None:
            raise ValueError("epilogue and residual together are not supported: add the residual to the "
                             "epilogue's output as its own op")
        n = epilogue.out_features(n_gemm)
    if prologue is not None:
        if not isinstance(prologue, PROLOGUES):
            raise TypeError(f"prologue must be jaxfp4.RMSNorm(weight, eps), jaxfp4.SwiGLU() or None, "
                            f"got {type(prologue).__name__}")
        if isinstance(a, NVFP4Tensor):
            raise TypeError("a prologue transforms float activations: a must not be an NVFP4Tensor")
        if isinstance(prologue, RMSNorm):
            w = prologue.weight
            if tuple(getattr(w, "shape", (None,))) != (k,):
                raise ValueError(f"RMSNorm.weight must have shape ({k},) (K of b), got "
                                 f"{getattr(w, 'shape', type(w).__name__)}")
            _check_float_dtype(w.dtype, "RMSNorm.weight.dtype")
    k_in = prologue.in_features(k) if prologue is not None else k
    if not isinstance(a, NVFP4Tensor):
        a = _check_matrix(a, "a", "[..., M, K] activations, or an NVFP4Tensor")
        if a.shape[-1] != k_in and prologue is not None:
            raise ValueError(f"with prologue {prologue!r}, a must have last dim {k_in} for b of K={k} "
                             f"({'[gate | up]: 2K' if k_in != k else 'K'}), got a of shape {tuple(a.shape)}")
        if a.shape[-1] != k_in:
            raise ValueError(f"a and b must share K: a is {describe(a)} (K={a.shape[-1]}), b is {describe(b)} "
                             f"(K={k})")
    *a_lead, m, _ = a.shape
    try:
        lead = tuple(np.broadcast_shapes(tuple(a_lead), tuple(b.batch_shape)))
    except ValueError:
        raise ValueError(f"the leading batch axes of a {tuple(a_lead)} and b {b.batch_shape} do not broadcast") from None
    if isinstance(epilogue, RotaryKVCache):
        epilogue.check_rows(int(np.prod(lead, dtype=np.int64)) * m, out_dtype)
    if residual is not None:
        if not hasattr(residual, "shape"):
            residual = jnp.asarray(residual)
        if residual.dtype != out_dtype:
            raise TypeError(f"residual must have out_dtype {np.dtype(out_dtype).name}, got {residual.dtype}")
        if tuple(residual.shape) != (*lead, m, n):
            raise ValueError(f"residual must have the output's shape {(*lead, m, n)}, got {tuple(residual.shape)}")
    g_a = input_scale
    if (isinstance(a, NVFP4Tensor) or any(d != 1 for d in b.batch_shape)
            or (g_a is not None and np.ndim(g_a) != 0)):
        return None
    rows = int(np.prod(lead, dtype=np.int64)) * m
    kind = "none" if prologue is None else prologue.kind
    norm_w = jnp.asarray(prologue.weight) if kind == "rms_norm" else jnp.zeros((0,), a.dtype)
    a_g = _global_scale(g_a, (), "input_scale") if g_a is not None else jnp.zeros((0,), jnp.float32)
    nb = len(b.batch_shape)
    data, scales = (x.reshape(x.shape[nb:]) for x in (b.data, b.scales))
    params = dict(prologue=kind, eps=prologue.eps if kind == "rms_norm" else 0.0,
                  epilogue="none" if epilogue is None else epilogue.kind, quantize_a=g_a is not None,
                  a_sf_layout=None if g_a is None else (
                      input_sf_layout or fmt.activation_sf_layout(rows, SMALL_M_MAX)),
                  b_sf_layout=b.sf_layout, b_packing=b.packing, b_shape=(n_gemm, k), out_dtype=out_dtype)
    return FusedCall((norm_w, a_g, data, scales, b.global_scale.reshape(())), params, lead, m, n, k_in)


def _with_rank(t: NVFP4Tensor, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(data, scales, g) with size-1 axes prepended up to `rank` batch axes."""
    extra = rank - len(t.batch_shape)
    grow = lambda x: x.reshape((1,) * extra + x.shape)
    return grow(t.data), grow(t.scales), grow(t.global_scale)


def _plain(t: NVFP4Tensor) -> NVFP4Tensor:
    """Validates a tensor's layout; unpacks pre-packed weights where an op needs plain ones."""
    fmt.check_sf_layout(t.sf_layout, "t.sf_layout")
    return unprepare_weights(t) if t.packing is not None else t


# ---- weight pre-packing ------------------------------------------------------------

def prepare_weights(t: NVFP4Tensor, *, packing: str = "sm90") -> NVFP4Tensor:
    """Repacks weights [..., N, K] offline into the order the GPU kernel loads
    fastest (exact and reversible: `unprepare_weights`). Use the result as
    matmul's b on any platform; do it once at load time, not per step."""
    t = _check_tensor(t, "t")
    if packing not in PACKING_IDS or packing is None:
        raise ValueError(f"packing must be one of {[p for p in PACKING_IDS if p]}, got {packing!r}")
    if t.packing is not None:
        return t if t.packing == packing else prepare_weights(unprepare_weights(t), packing=packing)
    n, k = t.shape[-2:]
    data, scales = packing_mod.pack_weights(t.data, t.scales, t.sf_layout)
    return NVFP4Tensor(data, scales, t.global_scale, t.sf_layout, packing=packing, packed_shape=(n, k))


def unprepare_weights(t: NVFP4Tensor) -> NVFP4Tensor:
    """The plain (checkpoint-order) tensor of pre-packed weights."""
    t = _check_tensor(t, "t")
    if t.packing is None:
        return t
    n, k = t.packed_shape
    data, scales = packing_mod.unpack_weights(t.data, t.scales, n, k, t.sf_layout)
    return NVFP4Tensor(data, scales, t.global_scale, t.sf_layout)


def interleave_gate_up(gate: NVFP4Tensor | jax.Array, up: NVFP4Tensor | jax.Array, *,
                       axis: int = -2) -> NVFP4Tensor | jax.Array:
    """The gate_up weight `matmul(..., epilogue=jaxfp4.InterleavedSwiGLU())`
    takes: gate's and up's rows (output features) alternating in blocks of 8
    (gate 0-7, up 0-7, gate 8-15, ...), exactly (a permutation of rows, codes
    and scales alike).

    gate, up: NVFP4Tensors [..., N_gate, K] (plain order, one equal global
    scale: the rows must share it to stay exact; checked where the scales are
    concrete), or float arrays interleaved along `axis` (e.g. a flax kernel
    [K, N_gate]: axis=-1) to quantize afterwards. N_gate % 8 == 0. Returns
    [..., 2 N_gate, K] (in gate's scale layout), or the interleaved array.
    """
    if isinstance(gate, NVFP4Tensor) or isinstance(up, NVFP4Tensor):
        gate, up = _check_tensor(gate, "gate"), _check_tensor(up, "up")
        if gate.shape != up.shape:
            raise ValueError(f"gate and up must have equal shapes, got {describe(gate)} and {describe(up)}")
        try:
            same = np.array_equal(np.asarray(gate.global_scale), np.asarray(up.global_scale))
        except jax.errors.ConcretizationTypeError:
            same = True  # traced: the caller's promise (documented)
        if not same:
            raise ValueError("gate and up must share their global scale to interleave exactly (quantize them "
                             "together, e.g. the concatenated bf16 weight, or requantize)")
        return _rows_permuted([gate, up], lambda g, u: _interleave_rows(g, u, -2), "interleave_gate_up")
    gate, up = jnp.asarray(gate), jnp.asarray(up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have equal shapes and dtypes, got {gate.shape} {gate.dtype} and "
                         f"{up.shape} {up.dtype}")
    return _interleave_rows(gate, up, axis)


def interleave_rotary(w: NVFP4Tensor | jax.Array, head_dim: int, *, axis: int = -2) -> NVFP4Tensor | jax.Array:
    """The qkv weight `matmul(..., epilogue=jaxfp4.RotaryKVCache(...))` takes:
    in every head (q, k and v heads alike: head_dim consecutive rows), the
    first and second halves' rows alternating in blocks of 8 (dims 0-7,
    half-0..half+7, 8-15, ...), which puts the dims RoPE rotates together
    (d, d + head_dim/2) 8 rows apart in one 16-row tile; exact (a permutation
    of rows, codes and scales alike).

    w: an NVFP4Tensor [..., N, K] (plain; prepare the result), or a float array
    interleaved along `axis` (e.g. a flax kernel [K, N]: axis=-1) to quantize
    afterwards. N % head_dim == 0, head_dim % 16 == 0.
    """
    if isinstance(w, NVFP4Tensor):
        return _rows_permuted([_check_tensor(w, "w")], lambda x: _interleave_heads(x, head_dim, -2),
                              "interleave_rotary")
    return _interleave_heads(jnp.asarray(w), head_dim, axis)


def _rows_permuted(ts: list[NVFP4Tensor], permute: Any, who: str) -> NVFP4Tensor:
    """The weight whose codes and (LINEAR) scales are `permute` of ts' codes and
    scales along the rows: exact, in ts[0]'s scale layout and global scale.
    Plain weights only (a prepared one's rows are tiles, not features)."""
    if any(t.packing is not None for t in ts):
        raise ValueError(f"{who}: pass plain weights (jaxfp4.unprepare_weights), then prepare the result")
    lin = [t.with_sf_layout("linear") for t in ts]
    data, scales = (permute(*(getattr(t, a) for t in lin)) for a in ("data", "scales"))
    return NVFP4Tensor(data, scales, ts[0].global_scale, "linear").with_sf_layout(ts[0].sf_layout)


def _interleave_heads(x: jax.Array, head_dim: int, axis: int) -> jax.Array:
    axis = axis % x.ndim
    n = x.shape[axis]
    if head_dim % (2 * GATE_UP_BLOCK) != 0 or n % head_dim != 0:
        raise ValueError(f"interleave_rotary needs head_dim % {2 * GATE_UP_BLOCK} == 0 and N % head_dim == 0, got "
                         f"head_dim={head_dim}, N={n} (axis {axis})")
    heads = x.reshape(*x.shape[:axis], n // head_dim, head_dim, *x.shape[axis + 1:])
    first, second = jnp.split(heads, 2, axis=axis + 1)
    return _interleave_rows(first, second, axis + 1).reshape(x.shape)


def _interleave_rows(x: jax.Array, y: jax.Array, axis: int) -> jax.Array:
    """x and y alternating in blocks of GATE_UP_BLOCK along axis."""
    axis = axis % x.ndim
    n = x.shape[axis]
    if n % GATE_UP_BLOCK != 0:
        raise ValueError(f"gate must have a multiple of {GATE_UP_BLOCK} rows along axis {axis} to interleave, got {n}")
    blocks = [z.reshape(*z.shape[:axis], n // GATE_UP_BLOCK, 1, GATE_UP_BLOCK, *z.shape[axis + 1:]) for z in (x, y)]
    both = jnp.concatenate(blocks, axis=axis + 1)
    return both.reshape(*x.shape[:axis], 2 * n, *x.shape[axis + 1:])


# ---- interchange with jnp.float4_e2m1fn (jax.nn.scaled_matmul, qwix) -------------------

def to_scaled_matmul_operands(t: NVFP4Tensor) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(data float4_e2m1fn [..., M, K], scales float8_e4m3fn LINEAR [..., M, K/16],
    global_scale float32 [...]), exact. For jax.nn.scaled_matmul multiply its
    output by g_a * g_b."""
    t = _plain(_check_tensor(t, "t"))
    m, k = t.shape[-2:]
    values = reference.e2m1_decode(reference.unpack_codes(t.data))
    return (values.astype(jnp.float4_e2m1fn), fmt.unswizzle(t.scales, m, k, t.sf_layout), t.global_scale)


def from_float4(data_f4: jax.Array, scales: jax.Array, global_scale: Any = 1.0, *,
                sf_layout: str = "128x4") -> NVFP4Tensor:
    """The NVFP4Tensor of float4_e2m1fn data [..., M, K] with LINEAR float8_e4m3fn
    scales [..., M, K/16] and decode scale g (exact)."""
    if getattr(data_f4, "dtype", None) != jnp.float4_e2m1fn:
        raise TypeError(f"data_f4 must have dtype float4_e2m1fn, got {getattr(data_f4, 'dtype', type(data_f4))}")
    if getattr(scales, "dtype", None) != jnp.float8_e4m3fn:
        raise TypeError(f"scales must have dtype float8_e4m3fn, got {getattr(scales, 'dtype', type(scales))}")
    if data_f4.ndim < 2:
        raise ValueError(f"data_f4 must have rank >= 2 ([..., M, K]), got shape {data_f4.shape}")
    *lead, m, k = data_f4.shape
    check_k(k, "data_f4")
    if tuple(scales.shape) != (*lead, m, k // fmt.BLOCK):
        raise ValueError(f"scales must be LINEAR with shape {(*lead, m, k // fmt.BLOCK)} "
                         f"for data_f4 {tuple(data_f4.shape)}, got {tuple(scales.shape)}")
    fmt.check_sf_layout(sf_layout)
    codes = reference.e2m1_encode(data_f4.astype(jnp.float32))
    return NVFP4Tensor(reference.pack_codes(codes), fmt.swizzle(scales, sf_layout),
                       _global_scale(global_scale, tuple(lead)), sf_layout)
