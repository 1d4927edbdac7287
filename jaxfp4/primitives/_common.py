"""Plumbing shared by the primitives: definition, lowering choice, batching."""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import dispatch  # apply_primitive: eager calls go through jit
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxfp4 import _ffi


def define(name: str) -> Primitive:
    prim = Primitive(name)
    prim.multiple_results = True
    prim.def_impl(partial(dispatch.apply_primitive, prim))
    return prim


def register_lowerings(prim: Primitive, *, op: str, native: Callable[[str, dict], tuple[str, dict] | None],
                       reference: Callable, choose: Callable | None = None) -> None:
    """Lowers `prim` per platform.

    native(platform, params) -> (ffi target name, attributes[, operand ->
    result aliases]) of the native handler for these params, or None where the
    reference is the intended lowering. `choose(platform, avals_in, params)` may
    return a jnp function to lower instead (an XLA path picked by shape, e.g. a
    large-M GEMM); `reference(*args, **params)` is the fallback everywhere.
    """

    def rule(ctx, *args, platform: str, **params):
        if choose is not None:
            alt = choose(platform, ctx.avals_in, params)
            if alt is not None:
                path, fn = alt
                _ffi.note_lowering(op, platform, path)
                return mlir.lower_fun(partial(fn, **params), multiple_results=True)(ctx, *args)
        chosen = native(platform, params)
        if chosen is not None and _ffi.has_target(chosen[0], platform):
            target, attrs, *aliases = chosen
            _ffi.note_lowering(op, platform, target)
            return jax.ffi.ffi_lowering(target, operand_output_aliases=aliases[0] if aliases else None)(
                ctx, *args, **attrs)
        # No handler by design (native() said None: XLA fuses the jnp well) or
        # a handler this build lacks (warned once).
        _ffi.note_lowering(op, platform, "reference", fallback=chosen is not None)
        return mlir.lower_fun(partial(reference, **params), multiple_results=True)(ctx, *args)

    for platform in ("cpu", "cuda"):
        mlir.register_lowering(prim, partial(rule, platform=platform), platform=platform)
    # Any other platform (rocm, tpu, ...): the reference.
    mlir.register_lowering(prim, partial(rule, platform="other"))


def i32(v: int) -> np.int32:
    return np.int32(v)


def to_front(x: jax.Array, bdim: int | None, size: int) -> jax.Array:
    """The vmapped axis of `x` moved to the front; an unmapped `x` gets a size-1 axis."""
    if bdim is None:
        return jnp.expand_dims(x, 0)
    return jnp.moveaxis(x, bdim, 0)


def batch_group(args: Sequence[jax.Array], dims: Sequence[int | None], size: int) -> list[jax.Array]:
    """Brings one operand group (e.g. data, scales, g of one tensor) to a common
    new leading axis: all size-1 if none is mapped (a broadcast), else all
    `size` (the few unmapped members are broadcast explicitly)."""
    if all(d is None for d in dims):
        return [jnp.expand_dims(a, 0) for a in args]
    out = []
    for a, d in zip(args, dims):
        a = to_front(a, d, size)
        out.append(jnp.broadcast_to(a, (size, *a.shape[1:])) if d is None else a)
    return out


def batch_size(args: Sequence[jax.Array], dims: Sequence[int | None]) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def register_batcher(prim: Primitive, rule: Callable) -> None:
    batching.primitive_batchers[prim] = rule


def broadcast_batch(*shapes: Sequence[int]) -> tuple[int, ...]:
    """numpy broadcast of leading batch shapes of equal rank (each dim equal or 1)."""
    return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
