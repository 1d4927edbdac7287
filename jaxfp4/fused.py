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

A decode step's qkv_proj takes its RoPE and KV-cache writes the same way:

    w_qkv = jaxfp4.interleave_rotary(w_qkv, head_dim)         # once, offline
    cos, sin = jaxfp4.rope_tables(positions, inv_freq)
    q, k_cache, v_cache = jaxfp4.matmul(h, w_qkv, prologue=jaxfp4.RMSNorm(norm_weight), epilogue=
        jaxfp4.RotaryKVCache(cos, sin, positions, k_cache, v_cache, heads=n_heads))

An epilogue needs no other output column than its own pair, so every GEMM
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
import numpy as np
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


@jax.tree_util.register_pytree_node_class
class RotaryKVCache:
    """qkv_proj's epilogue in a decode step: RoPE on the queries and keys, the
    keys and values written into the KV cache.

    For a qkv weight made by `jaxfp4.interleave_rotary(w_qkv, head_dim)` (the
    heads' rows reordered so that the dims RoPE rotates together, d and d +
    head_dim/2, sit 8 rows apart in one 16-row tile of the GPU kernel, as
    gate/up do for InterleavedSwiGLU), `jaxfp4.matmul(x, w, epilogue=e)`
    returns `(q, k_cache, v_cache)`: q [..., heads * head_dim] rotated (HF
    Llama's half-split RoPE: x1 * cos - x2 * sin, x2 * cos + x1 * sin in
    float32 on the rounded GEMM outputs, rounded again), and the caches with
    the rotated keys and the values of token row (b, s) at position
    positions[b, s] (positions outside [0, T) are not written). On the GPU
    (bf16, prepared weights, M <= 32) the GEMM kernel's store does all of it:
    no RoPE or cache-update kernels; pass the caches donated (or as loop
    carries) so XLA updates them in place.

    Attributes:
      cos, sin: float32 [S, head_dim / 2] or [B, S, head_dim / 2]: the
        rotation of each token (e.g. `jaxfp4.rope_tables(positions, inv_freq)`).
      positions: int32 [S] or [B, S]: each token's slot in the cache.
      k_cache, v_cache: [B, T, kv_heads, head_dim] in the GEMM's out_dtype.
      heads: the query heads; the weight's rows are heads + 2 kv_heads heads
        (q, k, v) of head_dim rows each.

    The GEMM's rows are the B * S tokens in row-major (b, s) order, however its
    leading axes are shaped.
    """

    kind = "rotary_kv_cache"

    def __init__(self, cos: Any, sin: Any, positions: Any, k_cache: Any, v_cache: Any, *, heads: int):
        self.cos, self.sin, self.positions = cos, sin, positions
        self.k_cache, self.v_cache = k_cache, v_cache
        self.heads = int(heads)

    def tree_flatten(self):
        return (self.cos, self.sin, self.positions, self.k_cache, self.v_cache), self.heads

    @classmethod
    def tree_unflatten(cls, heads, children):
        return cls(*children, heads=heads)

    def __repr__(self) -> str:
        return (f"RotaryKVCache(heads={self.heads}, k_cache={getattr(self.k_cache, 'shape', '?')}, "
                f"positions={getattr(self.positions, 'shape', '?')})")

    @property
    def kv_heads(self) -> int:
        return int(self.k_cache.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.k_cache.shape[3])

    @property
    def tokens(self) -> tuple[int, int]:
        """(B, S): the cache's batch and the tokens per batch row."""
        return int(self.k_cache.shape[0]), int(self.positions.shape[-1])

    def out_features(self, n: int) -> int:
        return self.heads * self.head_dim

    def check(self, n: int) -> None:
        """The rules on the arrays and on the GEMM's N (naming the argument)."""
        kc, vc = self.k_cache, self.v_cache
        if not (hasattr(kc, "shape") and hasattr(vc, "shape")) or len(kc.shape) != 4:
            raise ValueError(f"RotaryKVCache.k_cache must be [B, T, kv_heads, head_dim], got "
                             f"{getattr(kc, 'shape', type(kc).__name__)}")
        if tuple(vc.shape) != tuple(kc.shape) or vc.dtype != kc.dtype:
            raise ValueError(f"RotaryKVCache.v_cache must match k_cache ({tuple(kc.shape)} {kc.dtype}), got "
                             f"{tuple(vc.shape)} {vc.dtype}")
        b, _, kvh, d = kc.shape
        if d % (2 * GATE_UP_BLOCK) != 0:
            raise ValueError(f"RotaryKVCache needs head_dim % {2 * GATE_UP_BLOCK} == 0 (rotated halves in blocks "
                             f"of {GATE_UP_BLOCK}), got head_dim={d}")
        if self.heads < 1 or n != (self.heads + 2 * kvh) * d:
            raise ValueError(f"RotaryKVCache.heads: the weight's N must be (heads + 2 kv_heads) * head_dim = "
                             f"({self.heads} + 2 * {kvh}) * {d}, got N={n}")
        pos = self.positions
        if not hasattr(pos, "dtype") or not jnp.issubdtype(pos.dtype, jnp.integer) or pos.ndim not in (1, 2) or (
                pos.ndim == 2 and pos.shape[0] != b):
            raise ValueError(f"RotaryKVCache.positions must be integer [S] or [B={b}, S], got "
                             f"{getattr(pos, 'shape', '?')} {getattr(pos, 'dtype', type(pos).__name__)}")
        s = pos.shape[-1]
        for name in ("cos", "sin"):
            t = getattr(self, name)
            shape = tuple(getattr(t, "shape", ()))
            if getattr(t, "dtype", None) != jnp.float32 or shape not in ((s, d // 2), (b, s, d // 2)):
                raise ValueError(f"RotaryKVCache.{name} must be float32 [S={s}, {d // 2}] or [B={b}, S, {d // 2}], "
                                 f"got {shape} {getattr(t, 'dtype', type(t).__name__)}")

    def check_rows(self, rows: int, out_dtype: Any) -> None:
        b, s = self.tokens
        if rows != b * s:
            raise ValueError(f"RotaryKVCache.positions: the GEMM has {rows} token rows, the cache's batch times the "
                             f"positions' S is {b} * {s}")
        if self.k_cache.dtype != out_dtype:
            raise TypeError(f"RotaryKVCache.k_cache: the caches must have the GEMM's out_dtype "
                            f"{jnp.dtype(out_dtype).name}, got {self.k_cache.dtype}")

    def row_operands(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(cos [R, D/2], sin [R, D/2], slot [R] int32) per token row r = b * S + s:
        slot = b * T + position, or B * T (out of range: not written)."""
        (b, s), t, half = self.tokens, self.k_cache.shape[1], self.head_dim // 2
        pos = jnp.broadcast_to(jnp.asarray(self.positions, jnp.int32), (b, s))
        slot = jnp.where((pos >= 0) & (pos < t), jnp.arange(b, dtype=jnp.int32)[:, None] * t + pos, b * t)
        cos, sin = (jnp.broadcast_to(x, (b, s, half)).reshape(b * s, half) for x in (self.cos, self.sin))
        return cos, sin, slot.reshape(b * s)

    def __call__(self, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q [..., heads * head_dim], k_cache, v_cache) from the GEMM's output y [..., N]."""
        self.check(y.shape[-1])
        rows = int(np.prod(y.shape[:-1], dtype=np.int64))
        self.check_rows(rows, y.dtype)
        q, kc, vc = rotary_kv_rows(y.reshape(rows, -1), *self.row_operands(), self.k_cache, self.v_cache,
                                   heads=self.heads)
        return q.reshape(*y.shape[:-1], -1), kc, vc


def rotary_kv_rows(y: jax.Array, cos: jax.Array, sin: jax.Array, slot: jax.Array, k_cache: jax.Array,
                   v_cache: jax.Array, *, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RotaryKVCache on rows: y [R, N] (rotary-interleaved heads), cos/sin [R, D/2],
    slot [R] (b * T + position; out of range: dropped) -> (q [R, heads * D], caches)."""
    r = y.shape[0]
    b, t, kvh, d = k_cache.shape
    half, nh = d // 2, heads + 2 * kvh
    blocks = y.reshape(r, nh, half // GATE_UP_BLOCK, 2, GATE_UP_BLOCK)
    x1, x2 = (blocks[:, :, :, i].reshape(r, nh, half).astype(jnp.float32) for i in (0, 1))
    c, s = cos[:, None, :], sin[:, None, :]
    rot = heads + kvh  # q and k heads are rotated, v heads are not
    r1 = x1[:, :rot] * c - x2[:, :rot] * s
    r2 = x2[:, :rot] * c + x1[:, :rot] * s
    qk = jnp.concatenate([r1, r2], -1).astype(y.dtype)
    v = jnp.concatenate([x1[:, rot:], x2[:, rot:]], -1).astype(y.dtype)
    put = lambda cache, x: cache.reshape(b * t, kvh, d).at[slot].set(x.astype(cache.dtype), mode="drop").reshape(
        cache.shape)
    return qk[:, :heads].reshape(r, heads * d), put(k_cache, qk[:, heads:]), put(v_cache, v)


def rope_tables(positions: Any, inv_freq: Any) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) float32 [..., D/2] of positions [...] and inv_freq [D/2] (RotaryKVCache's cos and sin)."""
    ang = jnp.asarray(positions)[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


Epilogue = Union[InterleavedSwiGLU, RotaryKVCache]
EPILOGUES = (InterleavedSwiGLU, RotaryKVCache)
# fused_gemm_p's `epilogue` param -> the epilogue (the stateless ones; RotaryKVCache's
# arrays make it an op of its own: gemm_chain_p's rotary links).
EPILOGUE_BY_KIND = {InterleavedSwiGLU.kind: InterleavedSwiGLU()}


def add_residual(y: jax.Array, residual: jax.Array) -> jax.Array:
    """residual + y in float32, rounded to y's dtype (what `residual + y` gives
    for equal dtypes, spelled out so the fused kernel's rounding is defined)."""
    return (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(y.dtype)
