"""matmul_chain: NVFP4 matmuls in a row, each fed by the one before, as one op.

A decoder layer after its attention is such a chain: h = x + o_proj(attn),
gate_up = gate_up_proj(rms_norm(h)), y = h + down_proj(swiglu(gate_up)).
Written as

    h, gate_up, y = jaxfp4.matmul_chain(attn, [
        jaxfp4.Link(w_o, residual=x),
        jaxfp4.Link(w_gate_up, prologue=jaxfp4.RMSNorm(norm_w, eps)),
        jaxfp4.Link(w_down, prologue=jaxfp4.SwiGLU(), residual=0),  # + h, link 0's output
    ])

it returns the same arrays, bit for bit, as the three `jaxfp4.matmul` calls.
On the GPU, where every link runs as one fused kernel (bf16, prepared weights,
decode-size M; see `jaxfp4.matmul`'s prologue and residual), the chain is one
custom call whose kernels start early: each link after the first begins
copying its weights while the link before it finishes. XLA records every
custom call as a CUDA-graph node of its own, so separate calls cannot overlap
like this (benchmarks/kernel/NOTES.md, sessions 12 and 14).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4 import ops
from jaxfp4._checks import check_float_dtype
from jaxfp4.fused import Prologue, RotaryKVCache
from jaxfp4.primitives.gemm_chain import gemm_chain_p
from jaxfp4.tensor import NVFP4Tensor, describe


class Link(NamedTuple):
    """One matmul of a chain: `residual + matmul(prologue(x), weight, input_scale=...)`,
    or `matmul(prologue(x), weight, epilogue=...)`.

    weight: NVFP4Tensor [N, K] (prepared with jaxfp4.prepare_weights for the
      fast path). prologue: jaxfp4.RMSNorm, jaxfp4.SwiGLU or None.
    epilogue: jaxfp4.InterleavedSwiGLU, jaxfp4.RotaryKVCache or None (then no
      residual).
    residual: None, an array of the link's output shape and dtype, or an int j:
      the output of the chain's earlier link j.
    input_scale: W4A4 with a static activation decode scale (a float32 scalar),
      as `jaxfp4.matmul`'s; None for W4A16.
    """
    weight: NVFP4Tensor
    prologue: Prologue | None = None
    residual: jax.Array | int | None = None
    input_scale: Any = None
    epilogue: Any = None


def matmul_chain(a: jax.Array, links: Sequence[Link], *, out_dtype: Any = jnp.bfloat16) -> list[jax.Array]:
    """The outputs y_0 .. y_{n-1} of the chain: y_0 = link 0 applied to a
    [..., M, K_0], y_i = link i applied to y_{i-1}; each `jaxfp4.matmul(x,
    link.weight, input_scale=link.input_scale, prologue=link.prologue,
    residual=..., epilogue=link.epilogue, out_dtype=out_dtype)` with an int
    residual j standing for y_j. Returns every y_i ([..., M, N_i], out_dtype;
    N_i / 2 with InterleavedSwiGLU; with RotaryKVCache the tuple (q, k_cache,
    v_cache), whose q feeds the next link), bit for bit those calls'."""
    if isinstance(links, Link) or not isinstance(links, (list, tuple)) or not links:
        raise TypeError(f"links must be a non-empty list of jaxfp4.Link, got {type(links).__name__}")
    for i, link in enumerate(links):
        if not isinstance(link, Link):
            raise TypeError(f"links[{i}] must be a jaxfp4.Link, got {type(link).__name__}")
        if not isinstance(link.weight, NVFP4Tensor):
            raise TypeError(f"links[{i}].weight must be an NVFP4Tensor, got {describe(link.weight)}")
        r = link.residual
        if isinstance(r, (bool, np.bool_)) or (_link_index(r) is not None and not 0 <= r < i):
            raise ValueError(f"links[{i}].residual: an int names an earlier link's output (0 <= j < {i}), got {r!r}")
    out_dt = check_float_dtype(out_dtype, "out_dtype")
    calls = _fused_calls(a, links, out_dt)
    if calls is None:  # not one fused op per link (e.g. W4A4 input, batched weights): separate ops
        outs: list[Any] = []
        x = a
        q = lambda y: y[0] if isinstance(y, tuple) else y  # a rotary link's (q, k_cache, v_cache)
        for link in links:
            j = _link_index(link.residual)
            r = link.residual if j is None else q(outs[j])
            y = ops.matmul(x, link.weight, input_scale=link.input_scale, out_dtype=out_dt, prologue=link.prologue,
                           residual=r, epilogue=link.epilogue)
            outs.append(y)
            x = q(y)
        return outs
    f0 = calls[0]
    operands = [jnp.broadcast_to(a, (*f0.lead, f0.m, f0.k_in)).reshape(f0.rows, f0.k_in)]
    res_from = tuple(-1 if (j := _link_index(link.residual)) is None else j for link in links)
    for f, link, j in zip(calls, links, res_from):
        array = link.residual is not None and j < 0
        operands += [*f.operands, link.residual.reshape(f.rows, f.n) if array else jnp.zeros((0,), out_dt)]
        if isinstance(link.epilogue, RotaryKVCache):
            operands += [*link.epilogue.row_operands(), link.epilogue.k_cache, link.epilogue.v_cache]
    rotary = tuple(link.epilogue.heads if isinstance(link.epilogue, RotaryKVCache) else 0 for link in links)
    outs = gemm_chain_p.bind(*operands, links=tuple(tuple(sorted(f.params.items())) for f in calls),
                             res_from=res_from, rotary_heads=rotary)
    caches = iter(outs[len(links):])  # each rotary link's (k_cache, v_cache), in link order
    ys: list[Any] = []
    for y, f, heads in zip(outs, calls, rotary):
        y = y.reshape(*f.lead, f.m, f.n)
        ys.append((y, next(caches), next(caches)) if heads else y)
    return ys


def _fused_calls(a: Any, links: Sequence[Link], out_dt: Any) -> list[ops.FusedCall] | None:
    """Each link's fused_gemm_p call (checking its arguments, naming the link),
    or None where some link is not one fused op."""
    calls: list[ops.FusedCall] = []
    x = a
    for i, link in enumerate(links):
        r, j = link.residual, _link_index(link.residual)
        if j is not None:  # link j's output (checked: j < i, so calls[j] exists)
            r = jax.ShapeDtypeStruct((*calls[j].lead, calls[j].m, calls[j].n), out_dt)
        try:
            f = ops.fused_operands(x, link.weight, link.prologue, r, input_scale=link.input_scale,
                                   input_sf_layout=None, out_dtype=out_dt, epilogue=link.epilogue)
        except (TypeError, ValueError) as e:
            raise type(e)(f"links[{i}]: {e}") from None
        if f is None:
            return None
        calls.append(f)
        x = jax.ShapeDtypeStruct((*f.lead, f.m, f.n), out_dt)
    return calls


def _link_index(residual: Any) -> int | None:
    """The link a residual names (an int j), or None (an array, or no residual)."""
    if isinstance(residual, (int, np.integer)) and not isinstance(residual, (bool, np.bool_)):
        return int(residual)
    return None
