"""dequantize_p: data [*L, M, K/2], scales, g [*L] -> x_hat [*L, M, K].

Params: sf_layout, dtype (the output dtype).
"""

from __future__ import annotations

import numpy as np
from jax.core import ShapedArray

from jaxfp4 import reference
from jaxfp4.primitives import _common

dequantize_p = _common.define("jaxfp4_dequantize")


def _abstract_eval(data, scales, g, *, sf_layout: str, dtype):
    *lead, m, half_k = data.shape
    return [ShapedArray((*lead, m, 2 * half_k), np.dtype(dtype))]


def _reference(data, scales, g, *, sf_layout: str, dtype):
    return (reference.dequantize(data, scales, g, sf_layout=sf_layout, dtype=dtype),)


def _native(platform: str, params: dict):
    if platform != "cpu":
        return None  # on GPUs XLA fuses the reference's elementwise jnp into one kernel
    from jaxfp4 import format as fmt
    return "jaxfp4_dequantize", {"sf_layout": _common.i32(fmt.SF_LAYOUT_IDS[params["sf_layout"]])}


def _batch(args, dims, *, sf_layout: str, dtype):
    size = _common.batch_size(args, dims)
    args = _common.batch_group(args, dims, size)
    return dequantize_p.bind(*args, sf_layout=sf_layout, dtype=dtype), [0]


dequantize_p.def_abstract_eval(_abstract_eval)
_common.register_lowerings(dequantize_p, op="dequantize", native=_native, reference=_reference)
_common.register_batcher(dequantize_p, _batch)
