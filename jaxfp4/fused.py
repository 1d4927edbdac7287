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
An epilogue maps the GEMM's rounded output [..., M, N] to [..., M, N_out]:

    # x = h + down_proj(silu(gate) * up), the SwiGLU in gate_up's store
    w_gate_up = jaxfp4.interleave_gate_up(w_gate, w_up)      # once, offline
    act = jaxfp4.matmul(h, w_gate_up, prologue=jaxfp4.RMSNorm(norm_weight),
                        epilogue=jaxfp4.InterleavedSwiGLU())  # [..., M, N_gate]
    x = jaxfp4.matmul(act, w_down, residual=h)

The epilogue needs no other output column than its own pair, so every GEMM
block computes it for the outputs it stores; a prologue SwiGLU instead is
recomputed by every block for the whole row.
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


class _NoLeaves:
    """A pytree without leaves: the class alone says what it computes."""

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@jax.tree_util.register_pytree_node_class
class SwiGLU(_NoLeaves):
    """SwiGLU([gate | up]) = silu(gate) * up = gate * sigmoid(gate) * up in
    float32, rounded to x's dtype; x [..., 2K] holds gate in its first K
    columns and up in the last K (a fused gate_up projection's output)."""

    kind = "swiglu"

    def in_features(self, k: int) -> int:
        return 2 * k

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(x, 2, axis=-1)
        return _swiglu(gate, up, x.dtype)


Prologue = Union[RMSNorm, SwiGLU]
PROLOGUES = (RMSNorm, SwiGLU)

# Gate and up rows alternate in blocks of this many in an interleaved gate_up
# weight: one 16-row tile of the GPU kernel is 8 gate rows and the same 8 rows
# of up, so one thread's mma accumulators hold both halves of its outputs.
GATE_UP_BLOCK = 8


def _swiglu(gate: jax.Array, up: jax.Array, dtype: Any) -> jax.Array:
    g = gate.astype(jnp.float32)
    return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(dtype)


@jax.tree_util.register_pytree_node_class
class InterleavedSwiGLU(_NoLeaves):
    """The SwiGLU as a GEMM epilogue: y [..., 2 N_gate] -> silu(gate) * up
    [..., N_gate] in float32, rounded to y's dtype, where y's columns are gate
    and up interleaved in blocks of GATE_UP_BLOCK (8): gate 0-7, up 0-7, gate
    8-15, up 8-15, ... That is the output of a weight made by
    `jaxfp4.interleave_gate_up(w_gate, w_up)`; a plain [gate; up] concatenation
    would pair the wrong columns (no error can tell), so build gate_up weights
    for this epilogue with that function only."""

    kind = "swiglu_interleaved"

    def out_features(self, n: int) -> int:
        """N_out of the epilogue for a GEMM of N outputs."""
        return n // 2

    def check(self, n: int) -> None:
        if n % (2 * GATE_UP_BLOCK) != 0:
            raise ValueError(f"epilogue InterleavedSwiGLU needs N % {2 * GATE_UP_BLOCK} == 0 (interleaved gate and up "
                             f"blocks of {GATE_UP_BLOCK} rows), got N={n}")

    def __call__(self, y: jax.Array) -> jax.Array:
        n = y.shape[-1]
        self.check(n)
        blocks = y.reshape(*y.shape[:-1], n // (2 * GATE_UP_BLOCK), 2, GATE_UP_BLOCK)
        gate, up = (blocks[..., i, :].reshape(*y.shape[:-1], n // 2) for i in (0, 1))
        return _swiglu(gate, up, y.dtype)


Epilogue = InterleavedSwiGLU
EPILOGUES = (InterleavedSwiGLU,)
EPILOGUE_BY_KIND = {e.kind: e() for e in EPILOGUES}  # fused_gemm_p's `epilogue` param -> the epilogue


def add_residual(y: jax.Array, residual: jax.Array) -> jax.Array:
    """residual + y in float32, rounded to y's dtype (what `residual + y` gives
    for equal dtypes, spelled out so the fused kernel's rounding is defined)."""
    return (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(y.dtype)
