"""quantize_p: x [*L, M, K] (+ g [*L]) -> data, scales (+ g when dynamic).

Params: sf_layout ("linear" | "128x4" | "8x4"), dynamic (bool: g computed from
the finite amax per batch entry and returned as a third result).

quantize_decoded_p: x [*L, M, K], g [*L], g_b (g's shape) -> bf16 [*L, M, K],
the values quantize(x, g) stands for without g: e2m1(q) * SF, exact in bf16
(at most 5 significant bits, 2^-10 .. 2688), and g * g_b (float32): the W4A16
operands of gemm's W4A4 route on decoded activations, in one kernel instead of
the quantize kernel, an XLA decode and an XLA multiply.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.core import ShapedArray

from jaxfp4 import format as fmt
from jaxfp4 import reference
from jaxfp4.primitives import _common

quantize_p = _common.define("jaxfp4_quantize")


def _abstract_eval(x, *g, sf_layout: str, dynamic: bool):
    *lead, m, k = x.shape
    outs = [ShapedArray((*lead, m, k // 2), jnp.uint8),
            ShapedArray((*lead, *fmt.scale_shape(m, k, sf_layout)), jnp.float8_e4m3fn)]
    if dynamic:
        outs.append(ShapedArray(tuple(lead), jnp.float32))
    return outs


def _reference(x, *g, sf_layout: str, dynamic: bool):
    data, scales, g_out = reference.quantize(x, None if dynamic else g[0], sf_layout=sf_layout)
    return (data, scales, g_out) if dynamic else (data, scales)


def _native(platform: str, params: dict):
    target = "jaxfp4_quantize_dynamic" if params["dynamic"] else "jaxfp4_quantize"
    return target, {"sf_layout": _common.i32(fmt.SF_LAYOUT_IDS[params["sf_layout"]])}


def _batch(args, dims, *, sf_layout: str, dynamic: bool):
    size = _common.batch_size(args, dims)
    # x and g are one group: a mapped x with a shared g broadcasts g (tiny).
    args = _common.batch_group(args, dims, size)
    outs = quantize_p.bind(*args, sf_layout=sf_layout, dynamic=dynamic)
    return outs, [0] * len(outs)


quantize_p.def_abstract_eval(_abstract_eval)
_common.register_lowerings(quantize_p, op="quantize", native=_native, reference=_reference)
_common.register_batcher(quantize_p, _batch)

quantize_decoded_p = _common.define("jaxfp4_quantize_decoded")


def _decoded_abstract_eval(x, g, g_b):
    return [ShapedArray(x.shape, jnp.bfloat16), ShapedArray(g.shape, jnp.float32)]


def _decoded_reference(x, g, g_b):
    data, scales, _ = reference.quantize(x, g, sf_layout="linear")
    return [reference.dequantize_unscaled(data, scales, "linear").astype(jnp.bfloat16),
            g.astype(jnp.float32) * g_b.astype(jnp.float32)]


def _decoded_batch(args, dims):
    size = _common.batch_size(args, dims)
    return quantize_decoded_p.bind(*_common.batch_group(args, dims, size)), [0, 0]


quantize_decoded_p.def_abstract_eval(_decoded_abstract_eval)
_common.register_lowerings(quantize_decoded_p, op="quantize", reference=_decoded_reference,
                           native=lambda platform, params: ("jaxfp4_quantize_decoded", {}))
_common.register_batcher(quantize_decoded_p, _decoded_batch)
