"""Argument checks shared by the public entry points (ops, flax, dot_general):
each raises at trace time with a message that names the argument and the rule."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4 import format as fmt
from jaxfp4.tensor import describe

FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
FLOAT_NAMES = "float32, bfloat16 or float16"


def check_float_dtype(dtype: Any, arg: str) -> np.dtype:
    """dtype as a numpy dtype if it is float32/bfloat16/float16, else a TypeError naming `arg`."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{arg} must be a dtype ({FLOAT_NAMES}), got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{arg} must be {FLOAT_NAMES}, got {dt}")
    return dt


def is_float(x: Any) -> bool:
    """Whether x is an array of one of FLOAT_DTYPES."""
    return hasattr(x, "shape") and hasattr(x, "dtype") and np.dtype(x.dtype) in FLOAT_DTYPES


def check_k(k: int, where: str, what: str = "the last axis K={k}") -> None:
    """K must hold whole 16-element scale blocks; `what` names it ({k} is filled in)."""
    if k % fmt.BLOCK:
        raise ValueError(f"{where}: {what.format(k=k)} must be a multiple of {fmt.BLOCK} "
                         f"(one E4M3 scale per {fmt.BLOCK} elements)")


def decode_scalar(x: Any, label: str) -> jax.Array:
    """x as a float32 scalar (a decode scale g), else a ValueError starting with `label`."""
    x = jnp.asarray(x)
    if x.shape != () or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{label} must be a float32 scalar (a decode scale), got {describe(x)}")
    return x.astype(jnp.float32)
