"""gemm_chain_p: fused GEMMs in a row, each fed by the one before
(jaxfp4.matmul_chain): y_0 = fused(a, link 0), y_i = fused(y_{i-1}, link i),
where fused is fused_gemm_p and link i's residual is an operand, nothing, or
an earlier link's output (res_from[i] = j).

Operands: a [M, K_0], then per link fused_gemm_p's norm_weight, a_g, b_data,
b_scales, b_g, residual (empty where res_from names an output), and for a
rotary link (epilogue "rotary_kv_cache", jaxfp4.RotaryKVCache) five more:
cos [M, D/2], sin [M, D/2] (float32), slot [M] (int32: b * T + position, out
of range: not written), k_cache, v_cache [B, T, kv_heads, D]. Params:
`links`, per link fused_gemm_p's params as a tuple of (name, value) pairs;
`res_from`, per link -1 or j; `rotary_heads`, per link its query heads (0: not
a rotary link). Results: every link's output [M, N_i] (a rotary link's q [M,
heads * D]), then each rotary link's k_cache and v_cache (aliased to its
operands: updated in place).

Kernel choice (cuda): `jaxfp4_gemm_chain` where every link runs as one
jaxfp4_gemm_fused kernel on its own (fused_gemm.native_fits): one custom call
launching them back to back, each after the first a programmatic dependent
that copies its weights while the link before it finishes. Elsewhere the
links as separate fused_gemm_p ops (the composition), which is also the
reference: the chain's kernels are those ops' kernels, so the bits agree.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray

from jaxfp4 import format as fmt
from jaxfp4.fused import rotary_kv_rows
from jaxfp4.primitives import _common
from jaxfp4.primitives.fused_gemm import (EPILOGUE_IDS, PROLOGUE_IDS, apply_prologue, fused_gemm_p, native_fits,
                                          out_features)
from jaxfp4.primitives.gemm import PACKING_IDS

gemm_chain_p = _common.define("jaxfp4_gemm_chain")

PER_LINK = 6  # norm_weight, a_g, b_data, b_scales, b_g, residual
ROTARY_OPERANDS = 5  # cos, sin, slot, k_cache, v_cache
MAX_LINKS = 8  # the most links one jaxfp4_gemm_chain call takes (csrc: kMaxLinks); longer chains: separate ops


def _link_operands(ops, rotary_heads):
    """Per link (its 6 fused operands, its rotary operands or ())."""
    out, i = [], 0
    for heads in rotary_heads:
        extra = ROTARY_OPERANDS if heads else 0
        out.append((tuple(ops[i:i + PER_LINK]), tuple(ops[i + PER_LINK:i + PER_LINK + extra])))
        i += PER_LINK + extra
    return out


def _abstract_eval(a, *ops, links, res_from, rotary_heads):
    outs, caches = [], []
    for p, heads, (_, rot) in zip(links, rotary_heads, _link_operands(ops, rotary_heads)):
        p = dict(p)
        n = heads * rot[3].shape[-1] if heads else out_features(p)
        outs.append(ShapedArray((a.shape[0], n), np.dtype(p["out_dtype"])))
        caches += [ShapedArray(c.shape, c.dtype) for c in rot[3:]]
    return outs + caches


def _compose(a, *ops, links, res_from, rotary_heads):
    """The links as separate fused_gemm_p ops. A rotary link with a prologue: the
    prologue in jnp, then the link alone without it (a chain of one: on the GPU
    the kernel's epilogue where it fits, e.g. at 2-32 rows, which a prologue in
    the kernel is not); without one, the GEMM, then its epilogue in jnp."""
    outs, caches, x = [], [], a
    for i, (p, heads, (fused, rot)) in enumerate(zip(links, rotary_heads, _link_operands(ops, rotary_heads))):
        norm_w, a_g, b_data, b_scales, b_g, residual = fused
        if res_from[i] >= 0:
            residual = outs[res_from[i]]
        p = dict(p)
        if heads and p["prologue"] != "none":
            bare = {**p, "prologue": "none", "eps": 0.0}
            x, kc, vc = gemm_chain_p.bind(
                apply_prologue(x, norm_w, p["prologue"], p["eps"]), jnp.zeros((0,), x.dtype), a_g, b_data, b_scales,
                b_g, residual, *rot, links=(tuple(sorted(bare.items())),), res_from=(-1,), rotary_heads=(heads,))
            caches += [kc, vc]
        elif heads:
            (y,) = fused_gemm_p.bind(x, norm_w, a_g, b_data, b_scales, b_g, residual, **{**p, "epilogue": "none"})
            x, kc, vc = rotary_kv_rows(y, *rot, heads=heads)
            caches += [kc, vc]
        else:
            (x,) = fused_gemm_p.bind(x, norm_w, a_g, b_data, b_scales, b_g, residual, **p)
        outs.append(x)
    return outs + caches


def _choose(platform, avals_in, params):
    a, *ops = avals_in
    rows, links, res_from = a.shape[0], [dict(p) for p in params["links"]], params["res_from"]
    a_dtypes = [a.dtype] + [p["out_dtype"] for p in links[:-1]]  # link i's input: link i-1's output
    fused = [f for f, _ in _link_operands(ops, params["rotary_heads"])]
    fits = platform == "cuda" and len(links) <= MAX_LINKS and all(
        native_fits(rows, a_dtypes[i], fused[i][0].dtype, res_from[i] >= 0 or fused[i][5].size > 0, p)
        for i, p in enumerate(links))
    return None if fits else ("separate fused ops", _compose)


def _aliases(params):
    """Each rotary link's cache operands -> its cache results (updated in place)."""
    aliases, i, res = {}, 1, len(params["links"])
    for heads in params["rotary_heads"]:
        i += PER_LINK
        if heads:
            aliases.update({i + 3: res, i + 4: res + 1})
            i, res = i + ROTARY_OPERANDS, res + 2
    return aliases


def _native(platform, params):
    if platform != "cuda":
        return None
    links = [dict(p) for p in params["links"]]
    return "jaxfp4_gemm_chain", {
        "prologue": np.array([PROLOGUE_IDS[p["prologue"]] for p in links], np.int32),
        "eps": np.array([p["eps"] for p in links], np.float32),
        "epilogue": np.array([EPILOGUE_IDS[p["epilogue"]] for p in links], np.int32),
        "b_sf_layout": np.array([fmt.SF_LAYOUT_IDS[p["b_sf_layout"]] for p in links], np.int32),
        "b_packing": np.array([PACKING_IDS[p["b_packing"]] for p in links], np.int32),
        "res_from": np.array(params["res_from"], np.int32),
        "rotary_heads": np.array(params["rotary_heads"], np.int32)}, _aliases(params)


def _batch(args, dims, **params):
    # fused_gemm_p's batcher folds mapped activations into rows (or vmaps its composition).
    outs = jax.vmap(partial(_compose, **params), in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)


gemm_chain_p.def_abstract_eval(_abstract_eval)
_common.register_lowerings(gemm_chain_p, op="gemm_chain", native=_native, reference=_compose, choose=_choose)
_common.register_batcher(gemm_chain_p, _batch)
