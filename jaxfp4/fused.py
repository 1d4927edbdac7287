"""What a decoder does right before and after a projection, fused into it.

At decode batch sizes every small XLA kernel between two GEMMs costs about as
much as a small GEMM's own overhead (1-2 us each, launch-bound), so
`jaxfp4.matmul` can take them in:

    # h = x + o_proj(attn);  y = gate_up_proj(rms_norm(h))
    h = jaxfp4.matmul(attn, w_o, residual=x)
    y = jaxfp4.matmul(h, w_gate_up, prologue=jaxfp4.RMSNorm(norm_weight, eps=1e-5))
    # x = h + down_proj(silu(gate) * up), y = [gate | up]
    x = jaxfp4.matmul(y, w_down, prologue=jaxfp4.SwiGLU(), residual=h)

A prologue maps the activations a [..., M, K_in] to the GEMM's [..., M, K]
(`RMSNorm`: K_in = K; `SwiGLU`: K_in = 2K) in a's dtype; `residual` is added
to the GEMM's output, rounded as `residual + matmul(...)` would round it.
The classes below are also the reference of each prologue (calling one
applies it with jnp): the GPU kernel stages the same values, computed in
float32 and rounded once, but its sum of squares runs in another order and
its rsqrt, exp and division are the hardware approximations (a few float32
ulp), so a staged value near a rounding tie can land one bf16 ulp away.

Both are pytrees, so they pass through jit and vmap like arrays.
"""

from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp
from jax import lax


@jax.tree_util.register_pytree_node_class
class RMSNorm:
    """RMSNorm(x) = (x * rsqrt(mean(x^2, -1) + eps)) * weight in float32, rounded to
    x's dtype: the Llama/T5 norm (HF's LlamaRMSNorm, with the weight multiplied
    in float32).

    Attributes:
      weight: the norm's scale [K] (float32, bfloat16 or float16; the GPU
        kernel takes bfloat16 with bfloat16 activations).
      eps: added to the mean of squares.
    """

    kind = "rms_norm"

    def __init__(self, weight: Any, eps: float = 1e-6):
        self.weight = weight
        self.eps = float(eps)

    def in_features(self, k: int) -> int:
        """K_in of the activations for a GEMM of depth K."""
        return k

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return (y * jnp.asarray(self.weight).astype(jnp.float32)).astype(x.dtype)

    def tree_flatten(self):
        return (self.weight,), self.eps

    @classmethod
    def tree_unflatten(cls, eps, children):
        return cls(children[0], eps)

    def __repr__(self) -> str:
        return f"RMSNorm(weight={getattr(self.weight, 'shape', '?')}, eps={self.eps})"


@jax.tree_util.register_pytree_node_class
class SwiGLU:
    """SwiGLU([gate | up]) = silu(gate) * up = gate * sigmoid(gate) * up in
    float32, rounded to x's dtype; x [..., 2K] holds gate in its first K
    columns and up in the last K (a fused gate_up projection's output)."""

    kind = "swiglu"

    def in_features(self, k: int) -> int:
        return 2 * k

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        return (gate * jax.nn.sigmoid(gate) * up).astype(x.dtype)

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls()

    def __repr__(self) -> str:
        return "SwiGLU()"


Prologue = Union[RMSNorm, SwiGLU]
PROLOGUES = (RMSNorm, SwiGLU)


def add_residual(y: jax.Array, residual: jax.Array) -> jax.Array:
    """residual + y in float32, rounded to y's dtype (what `residual + y` gives
    for equal dtypes, spelled out so the fused kernel's rounding is defined)."""
    return (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(y.dtype)
