"""Flax (linen) entry points: an NVFP4 Dense layer and the tools that fill it.

- `Dense`: a Linear layer whose weight is stored in NVFP4, with ModelOpt's
  parameter names ("weight", "weight_scale", "weight_scale_2",
  "input_scale", "bias") so a checkpoint's tensors map 1:1 onto its params.
- `dense_params`: the param dict of one `Dense` from an `NVFP4Tensor`.
- `quantize_params`: turns the params of a model built from `nn.Dense` into
  those of the same model built from `jaxfp4.flax.Dense`.
- `NVFP4DotGeneral` (and `jaxfp4.dot_general`): quantize-on-the-fly drop-ins
  for `nn.Dense(dot_general_cls=...)` / `nnx.Linear(dot_general=...)`.

Everything here runs under jit, vmap, nn.vmap, nn.scan and nn.remat, for
inference (the jaxfp4 primitives have no gradients). Requires flax.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfp4 import format as fmt
from jaxfp4 import ops
from jaxfp4._checks import check_float_dtype, check_k, decode_scalar, is_float
from jaxfp4.chain import Link
from jaxfp4.dot_general import NVFP4DotGeneral, check_mode
from jaxfp4.fused import EPILOGUES, PROLOGUES, Epilogue, Prologue, add_residual
from jaxfp4.packing import packed_shapes
from jaxfp4.primitives.gemm import PACKING_IDS
from jaxfp4.tensor import NVFP4Tensor, describe

__all__ = ["Dense", "NVFP4DotGeneral", "dense_params", "quantize_params"]

_PACKINGS = tuple(PACKING_IDS)  # None (checkpoint order) and every prepare_weights order


def dense_params(weight: NVFP4Tensor, *, input_scale: Any = None, bias: Any = None,
                 packing: str | None = None) -> dict[str, jax.Array]:
    """The param dict of one `jaxfp4.flax.Dense` holding `weight`.

    Args:
      weight: an NVFP4Tensor [N, K] (checkpoint orientation, no batch axes) in
        any sf_layout, plain or pre-packed.
      input_scale: the static activation decode scale g_a (ModelOpt's
        `input_scale`), for a w4a4 Dense with static_input_scale=True; None
        leaves it out.
      bias: the [N] bias, kept as given; None leaves it out.
      packing: None for the checkpoint order (scales made linear), or "sm90"
        for `jaxfp4.prepare_weights`' order (the Dense needs the same
        `weight_packing`).

    Returns:
      {"weight", "weight_scale", "weight_scale_2"[, "input_scale"][, "bias"]}.
    """
    t = ops._check_tensor(weight, "weight")
    if t.ndim != 2:
        raise ValueError(f"weight must be an NVFP4Tensor [N, K] without batch axes, got {describe(t)}")
    if packing not in _PACKINGS:
        raise ValueError(f"packing must be one of {_PACKINGS}, got {packing!r}")
    t = ops.unprepare_weights(t).with_sf_layout("linear")
    if packing is not None:
        t = ops.prepare_weights(t, packing=packing)
    params = {"weight": t.data, "weight_scale": t.scales,
              "weight_scale_2": jnp.asarray(t.global_scale, jnp.float32)}
    if input_scale is not None:
        params["input_scale"] = decode_scalar(input_scale, "input_scale")
    if bias is not None:
        n = t.shape[0]
        if tuple(jnp.shape(bias)) != (n,):
            raise ValueError(f"bias must have shape ({n},) for weight {describe(t)}, got {jnp.shape(bias)}")
        params["bias"] = jnp.asarray(bias)
    return params


def quantize_params(params: Any, *, mode: str = "w4a16", packing: str | None = None,
                    predicate: Callable[[tuple[str, ...], jax.Array], bool] | None = None) -> dict:
    """The params of a model of `nn.Dense` layers, with those layers in NVFP4.

    Every dict in the tree that holds a 2-D float "kernel" [in, out] (and
    optionally a "bias"), which is what `nn.Dense` makes, becomes
    `dense_params(quantize(kernel.T))` (weights [N=out, K=in], dynamic global
    scale) with the bias kept as it is: the params of a `jaxfp4.flax.Dense`
    of `features=out`. Everything else is copied.

    These layers stay float (the model keeps an `nn.Dense` there):
    kernels whose in-dim is not a multiple of 16, kernels of other ranks
    (DenseGeneral, Conv) or non-float dtypes, and kernels for which
    `predicate(path, kernel)` is False (path: the tuple of dict keys leading
    to the layer, e.g. ("params", "head")); a common choice keeps the output
    head float.

    Args:
      params: a params tree (dicts or FrozenDicts), e.g. `model.init(...)`.
      mode: the `Dense.mode` the params are for ("w4a16" or "w4a4"). Both
        take the same params: w4a4 with a dynamic activation scale needs no
        "input_scale" (calibrate and use `dense_params` for static ones).
      packing: None, or "sm90" for the GPU kernel's pre-packed weight order
        (then use `Dense(weight_packing="sm90")`).
      predicate: an optional filter `(path, kernel) -> bool`.

    Returns:
      A new params tree of plain dicts.
    """
    check_mode(mode, "quantize_params")
    if packing not in _PACKINGS:
        raise ValueError(f"quantize_params: packing must be one of {_PACKINGS}, got {packing!r}")

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        kernel = node.get("kernel")
        if (kernel is not None and set(node) <= {"kernel", "bias"} and getattr(kernel, "ndim", None) == 2
                and is_float(kernel) and kernel.shape[0] % fmt.BLOCK == 0
                and (predicate is None or predicate(path, kernel))):
            w = ops.quantize(jnp.asarray(kernel).T, sf_layout="linear")
            return dense_params(w, bias=node.get("bias"), packing=packing)
        return {key: walk(value, (*path, str(key))) for key, value in node.items()}

    return walk(params, ())


def _check_prologue(prologue: Any, where: str) -> None:
    if prologue is not None and not isinstance(prologue, PROLOGUES):
        raise TypeError(f"{where}: prologue must be jaxfp4.RMSNorm, jaxfp4.SwiGLU or None, "
                        f"got {type(prologue).__name__}")


def _check_epilogue(epilogue: Any, use_bias: bool, features: int, where: str) -> None:
    if epilogue is None:
        return
    if not isinstance(epilogue, EPILOGUES):
        raise TypeError(f"{where}: epilogue must be jaxfp4.InterleavedSwiGLU, jaxfp4.RotaryKVCache or None, "
                        f"got {type(epilogue).__name__}")
    if use_bias:
        raise ValueError(f"{where}: an epilogue needs use_bias=False (the bias would come before the epilogue)")
    try:
        epilogue.check(features)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


class _LinkRequest(NamedTuple):
    """What Dense.link passes to __call__: a link of this input width, not an application."""
    in_features: int


class Dense(nn.Module):
    """A Linear layer y = x @ W.T (+ bias) with NVFP4 weights W [N, K].

    Params (ModelOpt names, so checkpoint tensors map 1:1):
      weight: uint8 [N, K/2] E2M1 codes (or the sm90 packed data).
      weight_scale: float8_e4m3fn [N, K/16] LINEAR block scales (or the packed scales).
      weight_scale_2: float32 scalar, the weight decode scale g_b.
      input_scale: float32 scalar g_a (only w4a4 with static_input_scale);
        `.init` sets 1.0 (fine for activations of magnitude ~1e-2..2e3).
      bias: [N] in `dtype` (only with use_bias).

    `.init` draws a float kernel [K, N] with kernel_init and quantizes its
    transpose (dynamic global scale); real weights come from a checkpoint,
    `dense_params` or `quantize_params`.

    Attributes:
      features: N, the output size.
      use_bias: whether to add a bias.
      mode: "w4a16" (weight-only; activations stay in `dtype`) or "w4a4"
        (activations quantized to NVFP4 too).
      dtype: activation compute and output dtype (float32, bfloat16, float16;
        x is cast to it). On a GPU, bfloat16/float16 run the W4A16 kernel,
        float32 activations the slower (exact) reference path.
      out_dtype: the output dtype if not `dtype` (float32, bfloat16,
        float16), e.g. float32 logits from a bfloat16 lm_head: the GEMM
        accumulates in float32 and rounds once to it, on the fast path.
      small_batch_threshold: w4a4 activations of M <= this many rows (M is
        the product of x's leading dims) get "8x4" scales, larger M "128x4".
      weight_packing: None (params in checkpoint order) or "sm90" (params in
        `jaxfp4.prepare_weights`' order, which the GPU kernel reads fastest).
      static_input_scale: w4a4 only: True quantizes activations with the
        `input_scale` param as g_a (one `matmul(x, w, input_scale=g_a)`: on
        the GPU, for M <= 8 and prepared weights, the GEMM kernel quantizes x
        itself), False with a dynamic global scale (a quantize, then the GEMM).
      kernel_init: the float kernel initializer used by `.init` ([K, N]).
      bias_init: the bias initializer.
    """

    features: int
    use_bias: bool = False
    mode: str = "w4a16"
    dtype: Any = jnp.bfloat16
    out_dtype: Any = None
    small_batch_threshold: int = 32
    weight_packing: str | None = None
    static_input_scale: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    def _where(self) -> str:
        path = "/".join(str(p) for p in self.scope.path) if self.scope is not None else ""
        return f"jaxfp4.flax.Dense at {path or self.name or '<top>'!r}"

    def _check_config(self) -> tuple[np.dtype, np.dtype]:
        """(compute dtype, output dtype), validated."""
        where = self._where()
        check_mode(self.mode, where)
        dt = check_float_dtype(self.dtype, f"{where}: dtype")
        out_dt = dt if self.out_dtype is None else check_float_dtype(self.out_dtype, f"{where}: out_dtype")
        if self.weight_packing not in _PACKINGS:
            raise ValueError(f"{where}: weight_packing must be one of {_PACKINGS}, got {self.weight_packing!r}")
        if not isinstance(self.features, (int, np.integer)) or self.features < 1:
            raise ValueError(f"{where}: features must be a positive int, got {self.features!r}")
        return dt, out_dt

    def _check_x(self, x: Any) -> jax.Array:
        where = self._where()
        if isinstance(x, np.ndarray):
            x = jnp.asarray(x)
        if not is_float(x):
            raise TypeError(f"{where}: x must be a float32, bfloat16 or float16 array [..., K], got {describe(x)}")
        if x.ndim < 1:
            raise ValueError(f"{where}: x must have rank >= 1 ([..., K]), got shape {x.shape}")
        check_k(x.shape[-1], where, "the last dim of x, K={k},")
        return x

    def _fresh(self, rng: jax.Array, k: int) -> dict[str, jax.Array]:
        """The params `.init` creates: a kernel_init kernel, quantized."""
        kernel = self.kernel_init(rng, (k, self.features), jnp.float32)
        return dense_params(ops.quantize(kernel.T, sf_layout="linear"), packing=self.weight_packing)

    def _weight(self, k: int) -> NVFP4Tensor:
        where, n = self._where(), self.features
        fresh: dict[str, jax.Array] = {}

        def get(name: str) -> jax.Array:
            if self.has_variable("params", name):
                # flax compares the init's shape with the param's: give it the
                # param itself, so that the checks below (which name the rule) decide.
                existing = self.get_variable("params", name)
                return self.param(name, lambda _: existing)

            def init(rng):
                if not fresh:  # the first missing param draws the kernel for all three
                    fresh.update(self._fresh(rng, k))
                return fresh[name]
            return self.param(name, init)

        data, scales, g = get("weight"), get("weight_scale"), get("weight_scale_2")
        if self.weight_packing is None:
            want_d, want_s = (n, k // 2), (n, k // fmt.BLOCK)
            if data.ndim == 2 and data.shape[0] == n and data.shape[1] != k // 2:
                raise ValueError(f"{where}: the last dim of x (K={k}) does not match the weight "
                                 f"(K={2 * data.shape[1]} from weight {tuple(data.shape)})")
        else:
            want_d, want_s = packed_shapes(n, k)
        order = "sm90 packed" if self.weight_packing else "codes"
        if data.dtype != jnp.uint8:
            raise TypeError(f"{where}: param 'weight' must be uint8 ({order}), got {describe(data)}")
        if tuple(data.shape) != want_d:
            raise ValueError(f"{where}: param 'weight' must have shape {want_d} ({order}) for features={n} "
                             f"and K={k} (the last dim of x), got {tuple(data.shape)}")
        if scales.dtype != jnp.float8_e4m3fn:
            raise TypeError(f"{where}: param 'weight_scale' must be float8_e4m3fn, got {describe(scales)}")
        if tuple(scales.shape) != want_s:
            raise ValueError(f"{where}: param 'weight_scale' must have shape {want_s} "
                             f"({'sm90 packed' if self.weight_packing else 'LINEAR'}), got {tuple(scales.shape)}")
        g = decode_scalar(g, f"{where}: param 'weight_scale_2'")
        packed = dict(packing=self.weight_packing, packed_shape=(n, k)) if self.weight_packing else {}
        return NVFP4Tensor(data, scales, g, "linear", **packed)

    @nn.compact
    def __call__(self, x: jax.Array, *, prologue: Prologue | None = None,
                 residual: jax.Array | None = None, epilogue: Epilogue | None = None) -> Any:
        """Applies the layer to x [..., K]; returns [..., features] in `out_dtype` (default `dtype`).

        prologue: `jaxfp4.RMSNorm` or `jaxfp4.SwiGLU` (x is then [..., 2K]),
        applied to x (cast to `dtype`) first; residual: [..., features] in the
        output dtype, added last (after the bias); epilogue (no bias, no
        residual): `jaxfp4.InterleavedSwiGLU()` on the output of a gate_up
        layer whose weight is `jaxfp4.interleave_gate_up(gate, up)` (returns
        [..., features / 2]), or `jaxfp4.RotaryKVCache(...)` on a qkv layer
        whose weight is `jaxfp4.interleave_rotary(w, head_dim)` (returns
        (q [..., heads * head_dim], k_cache, v_cache)). Without a bias, W4A16 and w4a4
        with static_input_scale run them inside the GEMM kernel on the GPU
        where they can (`jaxfp4.matmul`'s prologue, residual and epilogue);
        else they are separate ops.
        """
        dt, out_dt = self._check_config()
        if isinstance(x, _LinkRequest):  # from .link()
            return self._link(x.in_features, prologue, residual, epilogue)
        x = self._check_x(x)
        where = self._where()
        _check_prologue(prologue, where)
        _check_epilogue(epilogue, self.use_bias, self.features, where)
        k_in, lead = x.shape[-1], tuple(x.shape[:-1])
        k = k_in // prologue.in_features(1) if prologue is not None else k_in
        n_out = self.features if epilogue is None else epilogue.out_features(self.features)
        if residual is not None and epilogue is not None:
            raise ValueError(f"{where}: epilogue and residual together are not supported")
        if residual is not None and (tuple(jnp.shape(residual)) != (*lead, n_out)
                                     or jnp.result_type(residual) != out_dt):
            raise ValueError(f"{where}: residual must be {np.dtype(out_dt).name} {(*lead, n_out)} "
                             f"(the output's shape and dtype), got {describe(residual)}")
        w = self._weight(k)
        m = int(np.prod(lead))
        a = x.reshape(m, k_in).astype(dt)
        res = None if residual is None else residual.reshape(m, n_out)
        fusable = prologue is not None or residual is not None or epilogue is not None
        if fusable and not self.use_bias and (self.mode == "w4a16" or self.static_input_scale):
            # One op (on the GPU for decode-size M one kernel): prologue, GEMM, residual or epilogue.
            scale = {}
            if self.mode == "w4a4":
                scale = dict(input_scale=self._input_scale(),
                             input_sf_layout=fmt.activation_sf_layout(m, self.small_batch_threshold))
            try:
                y = ops.matmul(a, w, out_dtype=out_dt, prologue=prologue, residual=res, epilogue=epilogue, **scale)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from None
            if isinstance(y, tuple):  # RotaryKVCache: (q, k_cache, v_cache)
                return (y[0].reshape(*lead, n_out), *y[1:])
            return y.reshape(*lead, n_out)
        if prologue is not None:
            a = prologue(a)
        y = self._project(a, w, m, dt, out_dt).reshape(*lead, self.features)
        if epilogue is not None:
            try:
                return epilogue(y)  # no bias, no residual (checked above)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from None
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), dt).astype(out_dt)
        return y if residual is None else add_residual(y, residual)

    def link(self, in_features: int, *, prologue: Prologue | None = None,
             residual: jax.Array | int | None = None, epilogue: Epilogue | None = None) -> Link:
        """This layer as one link of a `jaxfp4.matmul_chain` (its params, created
        here on `.init`): `residual + self(prologue(x))` for x of width
        `in_features` (the layer's K; 2K into a SwiGLU prologue is its input,
        not K). residual: an array, or an int j, the chain's link j's output.
        The chain's out_dtype applies. Needs a layer without bias, W4A16 or W4A4
        with static_input_scale (what one fused op can run). epilogue: as
        __call__'s (the link's output is then [M, features / 2], or the
        RotaryKVCache tuple)."""
        # Through __call__, the module's one compact method (params are made there).
        return self(_LinkRequest(in_features), prologue=prologue, residual=residual, epilogue=epilogue)

    def _link(self, k: int, prologue: Prologue | None, residual: Any, epilogue: Epilogue | None) -> Link:
        where = self._where()
        if self.use_bias:
            raise ValueError(f"{where}: a chain link has no bias (use_bias=False)")
        if self.mode == "w4a4" and not self.static_input_scale:
            raise ValueError(f"{where}: a w4a4 chain link needs static_input_scale=True (the chain cannot "
                             "compute a dynamic global scale between its links)")
        _check_prologue(prologue, where)
        _check_epilogue(epilogue, self.use_bias, self.features, where)
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{where}: in_features must be a positive int, got {k!r}")
        check_k(k, where, "in_features, K={k},")
        scale = self._input_scale() if self.mode == "w4a4" else None
        return Link(self._weight(int(k)), prologue=prologue, residual=residual, input_scale=scale, epilogue=epilogue)

    def _input_scale(self) -> jax.Array:
        """The static activation decode scale g_a (w4a4 with static_input_scale)."""
        return decode_scalar(self.param("input_scale", lambda _: jnp.float32(1.0)),
                             f"{self._where()}: param 'input_scale'")

    def _project(self, a: jax.Array, w: NVFP4Tensor, m: int, dt: Any, out_dt: Any) -> jax.Array:
        """a [M, K] @ w.T in this layer's mode."""
        layout = fmt.activation_sf_layout(m, self.small_batch_threshold)
        if self.mode == "w4a4" and self.static_input_scale:
            # One op: on the GPU, for decode-size M, the GEMM kernel quantizes a itself.
            y = ops.matmul(a, w, input_scale=self._input_scale(), input_sf_layout=layout, out_dtype=out_dt)
        else:
            if self.mode == "w4a4":
                a = ops.quantize(a, None, sf_layout=layout)
            y = ops.matmul(a, w, out_dtype=out_dt)
        return y
