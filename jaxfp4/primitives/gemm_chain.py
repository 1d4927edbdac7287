"""gemm_chain_p: fused GEMMs in a row, each fed by the one before
(jaxfp4.matmul_chain): y_0 = fused(a, link 0), y_i = fused(y_{i-1}, link i),
where fused is fused_gemm_p and link i's residual is an operand, nothing, or
an earlier link's output (res_from[i] = j).

Operands: a [M, K_0], then per link fused_gemm_p's norm_weight, a_g, b_data,
b_scales, b_g, residual (empty where res_from names an output). Params:
`links`, per link fused_gemm_p's params as a tuple of (name, value) pairs;
`res_from`, per link -1 or j. Results: every link's output [M, N_i].

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
import numpy as np
from jax.core import ShapedArray

from jaxfp4 import format as fmt
from jaxfp4.primitives import _common
from jaxfp4.primitives.fused_gemm import EPILOGUE_IDS, PROLOGUE_IDS, fused_gemm_p, native_fits, out_features
from jaxfp4.primitives.gemm import PACKING_IDS

gemm_chain_p = _common.define("jaxfp4_gemm_chain")

PER_LINK = 6  # norm_weight, a_g, b_data, b_scales, b_g, residual
MAX_LINKS = 8  # the most links one jaxfp4_gemm_chain call takes (csrc: kMaxLinks); longer chains: separate ops


def _abstract_eval(a, *ops, links, res_from):
    return [ShapedArray((a.shape[0], out_features(dict(p))), np.dtype(dict(p)["out_dtype"])) for p in links]


def _compose(a, *ops, links, res_from):
    """The links as separate fused_gemm_p ops."""
    outs, x = [], a
    for i, p in enumerate(links):
        norm_w, a_g, b_data, b_scales, b_g, residual = ops[PER_LINK * i:PER_LINK * (i + 1)]
        if res_from[i] >= 0:
            residual = outs[res_from[i]]
        (x,) = fused_gemm_p.bind(x, norm_w, a_g, b_data, b_scales, b_g, residual, **dict(p))
        outs.append(x)
    return outs


def _choose(platform, avals_in, params):
    a, *ops = avals_in
    rows, links, res_from = a.shape[0], [dict(p) for p in params["links"]], params["res_from"]
    a_dtypes = [a.dtype] + [p["out_dtype"] for p in links[:-1]]  # link i's input: link i-1's output
    fits = platform == "cuda" and len(links) <= MAX_LINKS and all(
        native_fits(rows, a_dtypes[i], ops[PER_LINK * i].dtype, res_from[i] >= 0 or ops[PER_LINK * i + 5].size > 0, p)
        for i, p in enumerate(links))
    return None if fits else ("separate fused ops", _compose)


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
        "res_from": np.array(params["res_from"], np.int32)}


def _batch(args, dims, **params):
    # fused_gemm_p's batcher folds mapped activations into rows (or vmaps its composition).
    return jax.vmap(partial(_compose, **params), in_axes=tuple(dims))(*args), [0] * len(params["links"])


gemm_chain_p.def_abstract_eval(_abstract_eval)
_common.register_lowerings(gemm_chain_p, op="gemm_chain", native=_native, reference=_compose, choose=_choose)
_common.register_batcher(gemm_chain_p, _batch)
