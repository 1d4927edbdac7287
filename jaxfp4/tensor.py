"""NVFP4Tensor: packed E2M1 codes, E4M3 block scales and a float32 global scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jaxfp4 import format as fmt


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class NVFP4Tensor:
    """A quantized tensor of logical shape [..., M, K] (rows M, K % 16 == 0).

    Attributes:
      data: uint8 [..., M, K/2], two E2M1 codes a byte (element 2j in the low nibble).
      scales: float8_e4m3fn block scales, one per 16 elements along K: [..., M, K/16]
        in the "linear" layout, or the padded [..., Rp, Cp] of a swizzled layout.
      global_scale: float32 [...] (one per leading batch entry): the DECODE scale g,
        x ~= e2m1(q) * SF * g (ModelOpt's `weight_scale_2` / `input_scale`).
      sf_layout: "linear", "128x4" or "8x4" (static).
      packing: None for the checkpoint order above, or the name of a pre-packed
        weight order made by `jaxfp4.prepare_weights` (static).
      packed_shape: the logical (N, K) of pre-packed weights, whose arrays no
        longer show it (static; None when packing is None).
    """

    data: jax.Array
    scales: jax.Array
    global_scale: jax.Array
    sf_layout: str = field(default="128x4", metadata=dict(static=True))
    packing: str | None = field(default=None, metadata=dict(static=True))
    packed_shape: tuple[int, int] | None = field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [..., M, K] shape."""
        lead = tuple(self.global_scale.shape)
        if self.packed_shape is not None:
            return (*lead, *self.packed_shape)
        m, half_k = self.data.shape[-2:]
        return (*lead, m, 2 * half_k)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.global_scale.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.scales.nbytes + self.global_scale.nbytes)

    def with_sf_layout(self, sf_layout: str) -> "NVFP4Tensor":
        """The same values with the scales in another layout (exact re-indexing)."""
        fmt.check_sf_layout(sf_layout)
        if self.packing is not None:
            raise ValueError("with_sf_layout: unpack pre-packed weights first (jaxfp4.unprepare_weights)")
        if sf_layout == self.sf_layout:
            return self
        m, k = self.shape[-2:]
        linear = fmt.unswizzle(self.scales, m, k, self.sf_layout)
        return NVFP4Tensor(self.data, fmt.swizzle(linear, sf_layout), self.global_scale, sf_layout)

    def __repr__(self) -> str:
        extra = f", packing={self.packing!r}" if self.packing else ""
        return f"NVFP4Tensor(shape={self.shape}, sf_layout={self.sf_layout!r}{extra})"


def is_nvfp4(x: Any) -> bool:
    return isinstance(x, NVFP4Tensor)


def describe(x: Any) -> str:
    """Short description of an operand for error messages."""
    if isinstance(x, NVFP4Tensor):
        return repr(x)
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    return f"{type(x).__name__}(shape={shape}, dtype={dtype})"
