"""A drop-in for `jax.lax.dot_general` that runs the product in NVFP4.

`dot_general` has lax.dot_general's signature, so a float model switches to
4-bit weights without touching its code:

    nn.Dense(features, dot_general=jaxfp4.dot_general)                   # flax.linen
    nn.Dense(features, dot_general_cls=NVFP4DotGeneral)                  # the same, as a class
    nn.Dense(features, dot_general_cls=partial(NVFP4DotGeneral, mode="w4a4"))
    nnx.Linear(din, dout, dot_general=jaxfp4.dot_general, rngs=rngs)     # flax.nnx

The float weights (rhs) are quantized ON EVERY CALL, with a dynamic global
scale, then multiplied by `jaxfp4.matmul`. That is the quickest way to see a
model's accuracy in NVFP4 (and it is what a training-free "fake quant" eval
needs), but it reads the float weights each step: for speed, quantize once
(`jaxfp4.flax.quantize_params`) and run `jaxfp4.flax.Dense`. There are no
gradients: the jaxfp4 primitives have no differentiation rules.

This module needs only jax (no flax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4 import ops
from jaxfp4.format import activation_sf_layout
from jaxfp4._checks import check_float_dtype, check_k
from jaxfp4.tensor import describe

MODES = ("w4a16", "w4a4")
# Weights quantized on the fly keep linear scales: the gemm takes every layout,
# and linear is the cheapest to write.
WEIGHT_SF_LAYOUT = "linear"


def check_mode(mode: Any, where: str) -> str:
    """Returns mode if it is "w4a16" or "w4a4", else raises a ValueError naming `where`."""
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    return mode


def _float_operand(x: Any, arg: str) -> jax.Array:
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"jaxfp4.dot_general: {arg} must be an array, got {type(x).__name__}")
    check_float_dtype(x.dtype, f"jaxfp4.dot_general: {arg}.dtype")
    return x


def _single_axis(axes: Any, ndim: int, arg: str) -> int:
    axes = tuple(axes)
    if len(axes) != 1:
        raise NotImplementedError(
            f"jaxfp4.dot_general: exactly one contracting axis per operand is supported "
            f"(the K of NVFP4 blocks), got {arg} contracting axes {axes}")
    ax = int(axes[0])
    if not -ndim <= ax < ndim:
        raise ValueError(f"jaxfp4.dot_general: {arg} contracting axis {ax} is out of range for rank {ndim}")
    return ax % ndim


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, out_sharding: Any = None, *,
                mode: str = "w4a16", small_batch_threshold: int = 32) -> jax.Array:
    """`jax.lax.dot_general` with the float weights `rhs` quantized to NVFP4.

    Supported dimension numbers are those of a Dense/Linear layer: one
    contracting axis, the LAST axis of lhs, against any one axis of rhs, and no
    batch axes. rhs [.., K, ..] is moved to the checkpoint orientation [N, K]
    (N = the product of its other axes, in order) and quantized with a dynamic
    global scale and linear scales; the result has lax.dot_general's shape,
    lhs.shape[:-1] + rhs's other axes.

    Args:
      lhs: activations [..., K], float32, bfloat16 or float16. In "w4a16" mode
        they are multiplied in their own dtype (float32 is exact too, but on a
        GPU it runs the slower reference path: give the layer
        `dtype=jnp.bfloat16` for the fast kernel). In "w4a4" mode they are
        quantized too (dynamic global scale), with "8x4" scales when
        M = prod(lhs.shape[:-1]) <= small_batch_threshold, else "128x4".
      rhs: the float weights; K (its contracting axis) must be a multiple of 16.
      dimension_numbers: ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)).
      precision: accepted for compatibility and ignored: the NVFP4 GEMM fixes
        its arithmetic (exact products, float32 accumulation).
      preferred_element_type: the output dtype (float32, bfloat16 or float16);
        None gives the promoted dtype of lhs and rhs, like lax.dot_general.
      out_sharding: None, or the output's sharding (a NamedSharding, or a
        PartitionSpec under a mesh context): applied with `jax.sharding.reshard`
        when it names Explicit mesh axes, else `jax.lax.with_sharding_constraint`.
      mode: "w4a16" (weight-only) or "w4a4" (activations quantized too).
      small_batch_threshold: the largest M that uses "8x4" activation scales.

    Returns:
      The product, of shape lhs.shape[:-1] + (rhs's non-contracting axes).

    Raises:
      NotImplementedError: batch axes, several contracting axes, or a
        contracting axis of lhs other than its last one.
      ValueError / TypeError: bad mode, dtypes, K mismatch or K % 16 != 0.
    """
    check_mode(mode, "jaxfp4.dot_general")
    lhs = _float_operand(lhs, "lhs")
    rhs = _float_operand(rhs, "rhs")
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise ValueError("jaxfp4.dot_general: dimension_numbers must be "
                         f"((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), got {dimension_numbers!r}"
                         ) from None
    if tuple(lb) or tuple(rb):
        raise NotImplementedError(f"jaxfp4.dot_general: batch dimensions are not supported "
                                  f"(got lhs_batch={tuple(lb)}, rhs_batch={tuple(rb)}); use jax.vmap")
    if lhs.ndim < 1 or rhs.ndim < 2:
        raise ValueError(f"jaxfp4.dot_general: lhs must have rank >= 1 and rhs rank >= 2 (weights), "
                         f"got lhs {describe(lhs)} and rhs {describe(rhs)}")
    la = _single_axis(lc, lhs.ndim, "lhs")
    ra = _single_axis(rc, rhs.ndim, "rhs")
    if la != lhs.ndim - 1:
        raise NotImplementedError(f"jaxfp4.dot_general: lhs must contract its last axis "
                                  f"({lhs.ndim - 1}), got axis {la}")
    k = lhs.shape[-1]
    if rhs.shape[ra] != k:
        raise ValueError(f"jaxfp4.dot_general: contracting dims differ: lhs {describe(lhs)} has K={k}, "
                         f"rhs {describe(rhs)} has {rhs.shape[ra]} on axis {ra}")
    check_k(k, "jaxfp4.dot_general", "the contracting dim K={k}")
    if preferred_element_type is None:
        out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    else:
        out_dtype = check_float_dtype(preferred_element_type, "jaxfp4.dot_general: preferred_element_type")
    del precision  # see the docstring

    free = tuple(d for i, d in enumerate(rhs.shape) if i != ra)
    n = int(np.prod(free))
    w = ops.quantize(jnp.moveaxis(rhs, ra, -1).reshape(n, k), sf_layout=WEIGHT_SF_LAYOUT)
    m = int(np.prod(lhs.shape[:-1]))
    a = lhs.reshape(m, k)
    if mode == "w4a4":
        a = ops.quantize(a, sf_layout=activation_sf_layout(m, small_batch_threshold))
    out = ops.matmul(a, w, out_dtype=out_dtype).reshape(*lhs.shape[:-1], *free)
    return out if out_sharding is None else _shard_output(out, out_sharding)


def _shard_output(out: jax.Array, sharding: Any) -> jax.Array:
    """`reshard` where the sharding names Explicit mesh axes (what lax.dot_general's
    out_sharding means there), else `with_sharding_constraint`."""
    if isinstance(sharding, jax.sharding.PartitionSpec):
        mesh, spec = jax.sharding.get_abstract_mesh(), sharding
    else:
        mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    names = {n for entry in (spec or ()) if entry is not None
             for n in (entry if isinstance(entry, tuple) else (entry,))}
    types = dict(zip(mesh.axis_names, mesh.axis_types)) if getattr(mesh, "axis_names", None) else {}
    if any(types.get(n) == jax.sharding.AxisType.Explicit for n in names):
        return jax.sharding.reshard(out, sharding)
    return jax.lax.with_sharding_constraint(out, sharding)


@dataclass(frozen=True)
class NVFP4DotGeneral:
    """`jaxfp4.dot_general` with its options bound, for `dot_general_cls`.

    flax calls `dot_general_cls()` with no arguments, so bind options with
    functools.partial: `nn.Dense(8, dot_general_cls=partial(NVFP4DotGeneral, mode="w4a4"))`.

    Attributes:
      mode: "w4a16" (weight-only) or "w4a4".
      small_batch_threshold: the largest M that uses "8x4" activation scales (w4a4).
    """

    mode: str = "w4a16"
    small_batch_threshold: int = 32

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                 preferred_element_type: Any = None, out_sharding: Any = None) -> jax.Array:
        """Runs `jaxfp4.dot_general` with this object's mode and threshold."""
        return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding,
                           mode=self.mode, small_batch_threshold=self.small_batch_threshold)
