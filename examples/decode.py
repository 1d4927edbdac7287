"""Greedy decoding with a Llama-style model in bf16 and NVFP4 (W4A16, W4A4):
tokens/s, time per output token, and how close the NVFP4 logits stay to bf16.

    python examples/decode.py                          # GPU: llama-3.1-8b; CPU: tiny
    python examples/decode.py --config tiny --batches 1,4 --tokens 16 --models bf16,nvfp4-w4a16
    python examples/decode.py --checkpoint /models/Llama-3.1-8B-Instruct-FP4 [--no-fuse]
    python examples/decode.py --models bf16,nvfp4-w4a4 --dynamic-act-scale

All models run the SAME flax module; only the projections differ (`linear`:
"bf16" is nn.Dense, "w4a16"/"w4a4" jaxfp4.flax.Dense); embeddings, norms and
lm_head stay bf16. In every model (unless --no-fuse) the projections that share
an input are fused, their weights concatenated along the outputs: qkv_proj
(split into q, k, v) and gate_up_proj (gate, up): fewer, larger GEMMs and, for
W4A4, fewer activation quantizations. Random weights (default): scaled normal,
made on the device per projection (fused or not, the same bf16 model); the
NVFP4 models quantize those same bf16 weights. --checkpoint DIR (ModelOpt or
compressed-tensors NVFP4, via jaxfp4.checkpoint): the NVFP4 models use its
quantized linears and the bf16 baseline their DEQUANTIZED values
(jaxfp4.dequantize), so both hold the same weights and differ only in kernels
and (W4A4) activation quantization. Its parts concatenate exactly only if
their global scales are equal: the model is fused only if they are everywhere.

W4A4 activation scales are STATIC by default, as in deployed NVFP4 models: each
projection quantizes its input with a fixed decode scale g_a (ModelOpt's
`input_scale`): one quantize launch, no amax pass. They are the checkpoint's if
all its linears have one, else calibrated as ModelOpt does (calibrate): the bf16
model runs causally over the batches' random token rows plus --calib-seqs random
sequences, and each projection takes g_a = amax / (6 * 448) of its inputs.
--dynamic-act-scale computes g_a from every activation's amax on the fly.

One function is compiled per (model, batch): a jitted lax.fori_loop over decode
steps (one token each, a static-length KV cache, donated). The prompt runs
through the same loop with its tokens forced (prefill); then only the decode
loop is timed. Accuracy: each NVFP4 model is fed the bf16 model's tokens
(prompt and generated, teacher-forced) and its logits at every position are
compared with bf16's (mean cosine similarity, top-1 agreement). With random
weights the logits are flat, so top-1 flips on near-ties more than it would
with a trained model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

import jaxfp4
import jaxfp4.flax as jfx

MODELS = {"bf16": "bf16", "nvfp4-w4a16": "w4a16", "nvfp4-w4a4": "w4a4"}  # name -> linear
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # name -> parts
Params = dict[str, Any]
Cache = list[tuple[jax.Array, jax.Array]]
Scales = dict[tuple[str, ...], jax.Array]  # projection path -> its static input scale g_a


@dataclass(frozen=True)
class Config:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_theta: float = 10000.0
    rope_llama3: tuple[float, float, float, float] | None = None  # factor, low, high, orig len
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    bias: tuple[str, ...] = ()  # projections with a bias (e.g. q/k/v_proj for Qwen2)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "Config":
        d = d.get("text_config", d)
        heads, rs = d["num_attention_heads"], d.get("rope_scaling") or {}
        llama3 = (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                  rs["original_max_position_embeddings"]) if rs.get("rope_type", rs.get("type")) == "llama3" else None
        return cls(vocab=d["vocab_size"], hidden=d["hidden_size"], layers=d["num_hidden_layers"],
                   heads=heads, kv_heads=d.get("num_key_value_heads", heads),
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   ffn=d["intermediate_size"], rope_theta=d.get("rope_theta", 10000.0),
                   rope_llama3=llama3, norm_eps=d.get("rms_norm_eps", 1e-5),
                   tie_embeddings=d.get("tie_word_embeddings", False))


CONFIGS = {
    "tiny": Config(vocab=1024, hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, ffn=688),
    "llama-3.1-8b": Config(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                           ffn=14336, rope_theta=500000.0, rope_llama3=(8.0, 1.0, 4.0, 8192)),
}


# ---- the model -----------------------------------------------------------------------

def inv_freq(cfg: Config) -> np.ndarray:
    """RoPE inverse frequencies, with Llama 3's long-context rescaling when configured."""
    f = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    if cfg.rope_llama3 is None:
        return f.astype(np.float32)
    factor, low, high, orig = cfg.rope_llama3
    wavelen = 2 * np.pi / f
    smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)  # 0: long waves, 1: short
    return ((1 - smooth) * f / factor + smooth * f).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """Rotates x [B, S, H, D] by position (the half-split layout of HF Llama)."""
    ang = positions[:, None].astype(jnp.float32) * freqs[None]  # [S, D/2]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.bfloat16)
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        return (y * w.astype(jnp.float32)).astype(x.dtype)


class Embed(nn.Module):
    """A [vocab, hidden] table: token lookup, and the (bf16) lm_head x @ W^T."""
    vocab: int
    hidden: int

    def setup(self) -> None:
        self.weight = self.param("weight", nn.initializers.normal(1.0), (self.vocab, self.hidden),
                                 jnp.bfloat16)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.weight, tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("bsd,vd->bsv", x, self.weight, preferred_element_type=jnp.float32)


class Projections(nn.Module):
    """The settings every part of the model shares; `proj` makes one projection,
    nn.Dense (bf16) or jaxfp4.flax.Dense (NVFP4), with the HF module name (or a
    FUSED name); `projs` applies the parts of a FUSED group, fused or not."""
    cfg: Config
    linear: str = "bf16"  # "bf16" (nn.Dense) | "w4a16" | "w4a4" (jaxfp4.flax.Dense)
    packing: str | None = None
    static_input_scale: bool = False
    fused: bool = True  # qkv_proj and gate_up_proj instead of their parts

    def settings(self) -> dict[str, Any]:
        return dict(cfg=self.cfg, linear=self.linear, packing=self.packing,
                    static_input_scale=self.static_input_scale, fused=self.fused)

    def projs(self, name: str, x: jax.Array, *features: int) -> list[jax.Array]:
        """The outputs of FUSED[name]'s parts (of these features) for input x."""
        if not self.fused:
            return [self.proj(part, n)(x) for part, n in zip(FUSED[name], features)]
        return jnp.split(self.proj(name, sum(features))(x), np.cumsum(features[:-1]), axis=-1)

    def proj(self, name: str, features: int) -> nn.Module:
        bias = any(part in self.cfg.bias for part in FUSED.get(name, (name,)))
        if self.linear == "bf16":
            return nn.Dense(features, use_bias=bias, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                            name=name)
        return jfx.Dense(features, use_bias=bias, mode=self.linear, dtype=jnp.bfloat16,
                         weight_packing=self.packing, static_input_scale=self.static_input_scale,
                         name=name)


class Attention(Projections):
    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None) -> tuple[jax.Array, Any]:
        c = self.cfg
        b, s, _ = x.shape
        q, k, v = (y.reshape(b, s, -1, c.head_dim) for y in
                   self.projs("qkv_proj", x, *(n * c.head_dim for n in (c.heads, c.kv_heads, c.kv_heads))))
        freqs = inv_freq(c)
        q, k = rope(q, positions, freqs), rope(k, positions, freqs)
        if kv is None:  # no cache: attend to this call's tokens
            key_pos = positions
        else:  # write this call's keys/values at their positions, attend to the whole cache
            start = (0, positions[0], 0, 0)
            kv = (lax.dynamic_update_slice(kv[0], k, start), lax.dynamic_update_slice(kv[1], v, start))
            k, v = kv
            key_pos = jnp.arange(k.shape[1])
        q = q.reshape(b, s, c.kv_heads, c.heads // c.kv_heads, c.head_dim)  # grouped-query
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
        mask = key_pos[None, :] <= positions[:, None]  # causal, by position: [S, T]
        scores = jnp.where(mask, scores / math.sqrt(c.head_dim), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, c.heads * c.head_dim)
        return self.proj("o_proj", c.hidden)(out), kv


class MLP(Projections):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = self.projs("gate_up_proj", x, self.cfg.ffn, self.cfg.ffn)
        return self.proj("down_proj", self.cfg.hidden)(nn.silu(gate) * up)


class Block(Projections):
    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, kv: Any) -> tuple[jax.Array, Any]:
        kw = self.settings()
        h, kv = Attention(**kw, name="self_attn")(RMSNorm(self.cfg.norm_eps, name="input_layernorm")(x),
                                                  positions, kv)
        x = x + h
        x = x + MLP(**kw, name="mlp")(RMSNorm(self.cfg.norm_eps, name="post_attention_layernorm")(x))
        return x, kv


class Decoder(Projections):
    """tokens [B, S] at positions [S] -> (logits float32 [B, S, vocab], cache).
    With cache=None it is a plain causal forward over the S tokens."""

    def setup(self) -> None:
        c = self.cfg
        self.embed_tokens = Embed(c.vocab, c.hidden)
        self.layers = [Block(**self.settings()) for _ in range(c.layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = Embed(c.vocab, c.hidden)

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        x = self.embed_tokens(tokens)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, None if cache is None else cache[i])
            new_cache.append(kv)
        head = self.embed_tokens if self.cfg.tie_embeddings else self.lm_head
        return head.attend(self.norm(x)), None if cache is None else new_cache


def init_cache(cfg: Config, batch: int, max_len: int) -> Cache:
    shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
    return [(jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)) for _ in range(cfg.layers)]


# ---- weights -------------------------------------------------------------------------

def hf_name(path: tuple[str, ...]) -> str:
    """flax path -> HF name: ("layers_3", "mlp", "up_proj") -> "model.layers.3.mlp.up_proj"."""
    head, *rest = path
    if head.startswith("layers_"):
        return ".".join(["model", "layers", head.removeprefix("layers_"), *rest])
    return ".".join(path if head == "lm_head" else ["model", *path])


def param_shapes(cfg: Config) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The unfused bf16 model's flattened params (shapes only)."""
    toks = jnp.zeros((1, 1), jnp.int32)
    tree = jax.eval_shape(Decoder(cfg, fused=False).init, jax.random.key(0), toks, jnp.zeros((1,), jnp.int32))
    return traverse_util.flatten_dict(tree["params"])


def fuse_params(params: Params) -> Params:
    """The unfused model's bf16 params -> the fused model's: the kernels [K, N_i]
    (and biases; a missing one is zeros) of each FUSED group's parts concatenated
    along N, in order. Other params are shared (no copy)."""
    def fuse(module: dict) -> dict:
        out = {k: v for k, v in module.items() if not any(k in parts for parts in FUSED.values())}
        for name, parts in FUSED.items():
            if ps := [module[part] for part in parts if part in module]:
                out[name] = {"kernel": jnp.concatenate([p["kernel"] for p in ps], axis=1)}
                if any("bias" in p for p in ps):
                    out[name]["bias"] = jnp.concatenate(
                        [p.get("bias", jnp.zeros(p["kernel"].shape[1:], p["kernel"].dtype)) for p in ps])
        return out
    return {k: {m: fuse(v) for m, v in layer.items()} if k.startswith("layers_") else layer
            for k, layer in params.items()}


def concat_rows(ws: list[jaxfp4.NVFP4Tensor]) -> jaxfp4.NVFP4Tensor:
    """NVFP4 weights [N_i, K] with one global scale -> [sum N_i, K], exactly: the
    codes and the linear block scales concatenated along N."""
    if len(ws) == 1:
        return ws[0]
    if any(float(w.global_scale) != float(ws[0].global_scale) for w in ws):
        raise ValueError("only weights with equal global scales concatenate exactly")
    ws = [w.with_sf_layout("linear") for w in ws]
    data, scales = (jnp.concatenate([getattr(w, a) for w in ws]) for a in ("data", "scales"))
    return jaxfp4.NVFP4Tensor(data, scales, ws[0].global_scale, "linear")


@partial(jax.jit, static_argnums=2)
def scaled_normal(key: jax.Array, std: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return (jax.random.normal(key, shape) * std).astype(jnp.bfloat16)


def random_params(cfg: Config, seed: int, fused: bool = True) -> Params:
    """Scaled-normal bf16 weights, made on the device one tensor at a time: fan-in
    scaling, residual outputs (o_proj, down_proj) shrunk by sqrt(2 * layers).
    Made per projection, then (fused) fuse_params: the same model either way."""
    flat = {}
    for i, (path, sd) in enumerate(param_shapes(cfg).items()):
        std = 1.0
        if path[-1] == "kernel":
            std = sd.shape[0] ** -0.5 / (math.sqrt(2 * cfg.layers) if path[-2] in ("o_proj", "down_proj") else 1)
        elif path[0] == "lm_head":
            std = 2.0 * cfg.hidden ** -0.5
        elif path[-1] == "bias" or path[-2].endswith("norm"):
            flat[path] = (jnp.ones if path[-1] == "weight" else jnp.zeros)(sd.shape, jnp.bfloat16)
            continue
        flat[path] = scaled_normal(jax.random.fold_in(jax.random.key(seed), i), std, sd.shape)
    params = traverse_util.unflatten_dict(flat)
    return fuse_params(params) if fused else params


def checkpoint_params(cfg: Config, ckpt: Any, fuse: bool = True) -> tuple[Params, bool]:
    """(bf16 params, fused): the bf16 baseline of a quantized checkpoint, its
    linears dequantized (jaxfp4.dequantize), its other tensors as they are;
    fused (fuse_params) if `fuse` and, in every layer, the parts of each FUSED
    group have equal global scales (weight_scale_2, and input_scale if stored)."""
    flat, scales = {}, {}  # scales: (layer, module, fused name) -> {(g, g_a) of its parts}
    for path in param_shapes(cfg):
        name = hf_name(path[:-1])
        if path[-1] in ("kernel", "bias"):
            lw = ckpt.linears[name]
            x = jaxfp4.dequantize(jax.device_put(lw.weight), jnp.bfloat16).T if path[-1] == "kernel" else lw.bias
            group = next((f for f, parts in FUSED.items() if path[-2] in parts), path[-2])
            scales.setdefault((*path[:-2], group), set()).add(
                tuple(None if g is None else float(g) for g in (lw.weight.global_scale, lw.input_scale)))
        elif path[0] == "lm_head" and hf_name(path) not in ckpt.tensors:  # a quantized lm_head
            x = jaxfp4.dequantize(jax.device_put(ckpt.linears["lm_head"].weight), jnp.bfloat16)
        else:
            x = ckpt.tensors[hf_name(path)]
        flat[path] = jnp.asarray(x, jnp.bfloat16)
    fused = fuse and all(len(s) == 1 for s in scales.values())
    params = traverse_util.unflatten_dict(flat)
    return fuse_params(params) if fused else params, fused


def parts(ckpt: Any, path: tuple[str, ...]) -> list[Any]:
    """The checkpoint linears behind the projection at `path` (a FUSED one: its parts)."""
    return [ckpt.linears[hf_name((*path[:-1], part))] for part in FUSED.get(path[-1], (path[-1],))]


def nvfp4_params(params: Params, mode: str, packing: str | None, ckpt: Any = None,
                 input_scales: Scales | None = None) -> Params:
    """The NVFP4 model's params (fused like the bf16 `params`): without a
    checkpoint jaxfp4.flax.quantize_params of the bf16 params (every nn.Dense
    kernel quantized; jitted, one layer at a time), else dense_params of the
    checkpoint's linears (a fused one: concat_rows of its parts). The other
    tensors, biases included, are shared with `params` (no copy). W4A4 with
    static activation scales: `input_scales` {projection path: g_a} are added."""
    if ckpt is None:
        quantize = jax.jit(partial(jfx.quantize_params, mode=mode, packing=packing))
        out = traverse_util.flatten_dict({k: quantize(v) if k.startswith("layers_") else v
                                          for k, v in params.items()})
    else:
        flat = traverse_util.flatten_dict(params)
        out = {path: x for path, x in flat.items() if path[-1] != "kernel"}
        for path in (p[:-1] for p in flat if p[-1] == "kernel"):
            dense = jfx.dense_params(concat_rows([lw.weight for lw in parts(ckpt, path)]), packing=packing)
            out.update({(*path, k): v for k, v in dense.items()})
    out.update({(*path, "input_scale"): g for path, g in (input_scales or {}).items()})
    return traverse_util.unflatten_dict(out)


# ---- static activation scales ----------------------------------------------------------

def calibrate(cfg: Config, params: Params, tokens: jax.Array, fused: bool = True) -> Scales:
    """Max calibration (as ModelOpt's): the bf16 model's causal forward over tokens
    [R, S], a method interceptor (the model is unchanged) sowing every nn.Dense's
    input amax into "intermediates"; each projection gets g_a = amax / (6 * 448),
    which puts amax on the largest NVFP4 value (E2M1 6 x E4M3 448). {path: g_a}."""
    def record(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            context.module.sow("intermediates", "input_amax", jnp.max(jnp.abs(args[0])).astype(jnp.float32),
                               reduce_fn=jnp.maximum, init_fn=lambda: jnp.float32(0.0))
        return next_fun(*args, **kwargs)

    @jax.jit
    def input_amax(params: Params, tokens: jax.Array) -> Params:
        with nn.intercept_methods(record):
            _, state = Decoder(cfg, fused=fused).apply({"params": params}, tokens, jnp.arange(tokens.shape[1]),
                                                       mutable=["intermediates"])
        return state["intermediates"]  # the logits are unused: XLA drops the lm_head
    amax = traverse_util.flatten_dict(input_amax(params, tokens))
    return {path[:-1]: jnp.maximum(a / (6 * 448), jnp.finfo(jnp.float32).tiny)  # > 0 for an all-zero input
            for path, a in amax.items()}


def activation_scales(args: argparse.Namespace, cfg: Config, params: Params, ckpt: Any, fused: bool,
                      rows: list[jax.Array]) -> tuple[Scales | None, str]:
    """(the W4A4 models' input scales {projection path: g_a}, how made): None with
    --dynamic-act-scale; the checkpoint's if all its linears have one (a fused
    projection: its parts', equal where fused); else calibrate over `rows` (the
    batches' random token rows, max_len each) and --calib-seqs more of max_len."""
    if args.dynamic_act_scale:
        return None, "dynamic"
    if ckpt is not None:
        lws = {p[:-1]: parts(ckpt, p[:-1]) for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"}
        if all(lw.input_scale is not None for ps in lws.values() for lw in ps):
            scales = {path: jnp.asarray(ps[0].input_scale, jnp.float32) for path, ps in lws.items()}
            return scales, "static (checkpoint)"
    key = jax.random.fold_in(jax.random.key(args.seed), 0xCA1)  # apart from the prompts' keys
    tokens = jnp.concatenate([*rows, jax.random.randint(key, (args.calib_seqs, args.max_len), 0, cfg.vocab)])
    return calibrate(cfg, params, tokens, fused), f"static (calibrated on {tokens.size} tokens)"


# ---- generation ----------------------------------------------------------------------

def make_generate(model: Decoder) -> Callable:
    """generate(params, cache, tokens [B, L], logits [L, B, V], n_forced, start, stop):
    steps i in [start, stop) feed tokens[:, i] at position i, store its logits
    in logits[i] and set tokens[:, i+1] to the greedy token, unless i+1 < n_forced
    (the forced prefix: prompt or teacher forcing). cache, tokens, logits are donated."""
    def generate(params, cache, tokens, logits, n_forced, start, stop):
        def step(i, carry):
            cache, tokens, logits = carry
            tok = lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
            out, cache = model.apply({"params": params}, tok, i[None], cache)
            logits = lax.dynamic_update_index_in_dim(logits, out[:, 0].astype(logits.dtype), i, 0)
            forced = lax.dynamic_index_in_dim(tokens, i + 1, axis=1, keepdims=False)
            nxt = jnp.where(i + 1 < n_forced, forced, jnp.argmax(out[:, 0], -1).astype(jnp.int32))
            return cache, lax.dynamic_update_index_in_dim(tokens, nxt, i + 1, 1), logits
        return lax.fori_loop(start, stop, step, (cache, tokens, logits))
    return jax.jit(generate, donate_argnums=(1, 2, 3))


def buffers(cfg: Config, batch: int, max_len: int, tokens: jax.Array | None = None) -> tuple:
    """Fresh (cache, tokens, logits) for one run."""
    if tokens is None:
        tokens = jnp.zeros((batch, max_len), jnp.int32)
    return init_cache(cfg, batch, max_len), jnp.array(tokens), jnp.zeros((max_len, batch, cfg.vocab), jnp.float32)


def compile_all(generate: Callable, params: Params, cfg: Config, batches: list[int], max_len: int) -> dict:
    """AOT-compiles generate for every batch size, the XLA compiles in parallel threads."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = {b: generate.lower(params, *jax.eval_shape(lambda b=b: buffers(cfg, b, max_len)), i32, i32, i32)
               for b in batches}
    with ThreadPoolExecutor(len(batches)) as pool:
        futures = {b: pool.submit(low.compile) for b, low in lowered.items()}
        return {b: f.result() for b, f in futures.items()}


@dataclass
class Row:
    model: str
    batch: int
    tokens_per_s: float
    ms_per_token: float
    speedup: float | None = None
    cosine: float | None = None
    top1: float | None = None


def accuracy(logits: jax.Array, ref: jax.Array, n: int) -> tuple[float, float]:
    """Mean cosine similarity and top-1 agreement of logits vs ref over the first n steps."""
    a, r = logits[:n].astype(jnp.float32), ref[:n].astype(jnp.float32)
    cos = jnp.sum(a * r, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(r, axis=-1) + 1e-30)
    top1 = jnp.argmax(a, -1) == jnp.argmax(r, -1)
    return float(jnp.mean(cos)), float(jnp.mean(top1))


def bench(run: Callable, params: Params, cfg: Config, prompt: jax.Array, ref: tuple | None,
          prompt_len: int, tokens: int, max_len: int) -> tuple[float, tuple, tuple[float, float] | None]:
    """One (model, batch): a warm-up run (without `ref`: greedy, giving the reference
    (tokens, logits); with it: teacher-forced, giving the accuracy), then prefill and
    the timed decode loop. Returns (decode seconds, ref, accuracy or None)."""
    n, batch, i32 = prompt_len + tokens, prompt.shape[0], jnp.int32
    if ref is None:  # the reference model: greedy from the prompt
        _, *ref = jax.block_until_ready(run(params, *buffers(cfg, batch, max_len, prompt), i32(prompt_len),
                                            i32(0), i32(n)))
        acc = None
    else:  # fed the reference tokens at every position
        out = run(params, *buffers(cfg, batch, max_len, ref[0]), i32(max_len), i32(0), i32(n))
        acc = accuracy(out[2], ref[1], n)
    state = run(params, *buffers(cfg, batch, max_len, prompt), i32(prompt_len), i32(0), i32(prompt_len))
    jax.block_until_ready(state)  # prefill done
    t0 = time.perf_counter()
    jax.block_until_ready(run(params, *state, i32(prompt_len), i32(prompt_len), i32(n)))
    return time.perf_counter() - t0, tuple(ref), acc


class Bar:
    """A minimal stderr progress bar (when tqdm is not installed)."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.note = total, 0, ""

    def set_postfix_str(self, note: str) -> None:
        self.note = note
        self.update(0)

    def update(self, k: int = 1) -> None:
        self.n += k
        done = 30 * self.n // max(self.total, 1)
        print(f"\r[{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total} {self.note:<40}", end="", file=sys.stderr)

    def close(self) -> None:
        print(file=sys.stderr)


def progress(total: int) -> Any:
    try:
        from tqdm import tqdm
        return tqdm(total=total, file=sys.stderr, unit="run")
    except ImportError:
        return Bar(total)


# ---- report ------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = [f"{'model':<13} {'batch':>5} {'tokens/s':>10} {'ms/token':>9} {'vs bf16':>8} "
             f"{'logit cos':>9} {'top-1':>6}"]
    for r in rows:
        lines.append(f"{r.model:<13} {r.batch:>5} {r.tokens_per_s:>10.1f} {r.ms_per_token:>9.2f} "
                     f"{fmt(r.speedup, '7.2f') + ('x' if r.speedup else ''):>8} "
                     f"{fmt(r.cosine, '9.4f'):>9} {fmt(r.top1, '6.1%'):>6}")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r.model for r in rows):
        pts = [(r.batch, r.tokens_per_s) for r in rows if r.model == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s (decode)", title=title)
    ax.set_xticks(sorted({r.batch for r in rows}), labels=sorted({r.batch for r in rows}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"plot: {path}")


# ---- main ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama-3.1-8b" if gpu else "tiny")
    p.add_argument("--checkpoint", help="an NVFP4 checkpoint directory (jaxfp4.checkpoint.load)")
    p.add_argument("--batches", default="1,4,16,32", help="comma-separated batch sizes")
    p.add_argument("--tokens", type=int, default=64 if gpu else 16, help="decode steps timed")
    p.add_argument("--prompt-len", type=int, default=16 if gpu else 8)
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--plot", help="PNG path ('' for none); default benchmarks/results/decode_<backend>_<config>.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, help="KV-cache length (default prompt-len + tokens + 1)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="separate q/k/v and gate/up projections (default: fused qkv_proj, gate_up_proj)")
    p.add_argument("--dynamic-act-scale", action="store_true", help="W4A4: dynamic activation global "
                   "scales (an amax pass per projection), not static ones (the checkpoint's or calibrated)")
    p.add_argument("--calib-seqs", type=int, default=4, help="extra random sequences to calibrate on")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if unknown := set(args.models.split(",")) - set(MODELS):
        p.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    args.models = [m for m in MODELS if m in args.models.split(",")]  # bf16 first: the reference
    args.max_len = args.max_len or args.prompt_len + args.tokens + 1
    if args.max_len < args.prompt_len + args.tokens + 1:
        p.error("--max-len must be at least prompt-len + tokens + 1")
    return args


def load_weights(args: argparse.Namespace) -> tuple[Config, Params, Any, str, bool]:
    """(config, bf16 params, checkpoint or None, name, fused) for --checkpoint or --config."""
    if not args.checkpoint:
        cfg = CONFIGS[args.config]
        return cfg, random_params(cfg, args.seed, args.fuse), None, args.config, args.fuse
    from jaxfp4 import checkpoint
    ckpt = checkpoint.load(args.checkpoint)
    attn = {p: ckpt.linears[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    cfg = replace(Config.from_hf(ckpt.config), bias=tuple(p for p, lw in attn.items() if lw.bias is not None))
    params, fused = checkpoint_params(cfg, ckpt, args.fuse)
    return cfg, params, ckpt, os.path.basename(os.path.normpath(args.checkpoint)), fused


def report(rows: list[Row], notes: list[str], args: argparse.Namespace, name: str) -> None:
    base = {r.batch: r.tokens_per_s for r in rows if r.model == "bf16"}
    for r in rows:
        r.speedup = r.tokens_per_s / base[r.batch] if r.batch in base else None
    backend, device = jax.default_backend(), jax.devices()[0].device_kind
    print(f"\ndecode, {name}, {backend} ({device}): prompt {args.prompt_len}, {args.tokens} timed tokens; "
          f"accuracy vs bf16 over {args.prompt_len + args.tokens} positions")
    print(table(rows))
    print("weights and compile time (all batch sizes):", "; ".join(notes))
    path = args.plot
    if path is None:
        path = str(Path(__file__).resolve().parents[1] / f"benchmarks/results/decode_{backend}_{name}.png")
    if path:
        plot(rows, path, f"decode {name} on {device}")
    print(f"backend: {backend} ({device}); jaxfp4 kernels run: {jaxfp4.backend_info()['kernels_run'] or 'none'}")


def main(argv: list[str] | None = None) -> list[Row]:
    start = time.perf_counter()
    args = parse_args(argv)
    packing = "sm90" if jax.default_backend() == "gpu" else None
    cfg, base, ckpt, name, fused = load_weights(args)
    print(f"{name}: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads}/{cfg.kv_heads} heads, "
          f"ffn {cfg.ffn}, vocab {cfg.vocab}; prompt {args.prompt_len}, decode {args.tokens} tokens")
    print("projections: " + ("fused qkv_proj, gate_up_proj" if fused else "unfused (--no-fuse)" if not args.fuse
                             else "unfused (the checkpoint's q/k/v or gate/up global scales differ)"))
    prompts = {b: jax.random.randint(jax.random.key(args.seed + b), (b, args.max_len), 0, cfg.vocab, jnp.int32)
               for b in args.batches}
    rows, refs, notes, t0, scales = [], {}, [], time.perf_counter(), None
    if "nvfp4-w4a4" in args.models:
        scales, how = activation_scales(args, cfg, base, ckpt, fused, list(prompts.values()))
        print(f"activation scales: {how}")
        if "calibrated" in how:
            notes.append(f"input scales calibrated in {time.perf_counter() - t0:.1f} s")
    bar = progress(len(args.models) * len(args.batches))
    for model_name in args.models:  # bf16 first: its runs are the reference
        linear = MODELS[model_name]
        static = linear == "w4a4" and scales is not None
        params = base if linear == "bf16" else nvfp4_params(base, linear, packing, ckpt, scales if static else None)
        model = Decoder(cfg, linear, packing, static, fused)
        bar.set_postfix_str(f"compiling {model_name}")
        t0 = time.perf_counter()
        runs = compile_all(make_generate(model), params, cfg, args.batches, args.max_len)
        mib = sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20
        notes.append(f"{model_name} {mib:.1f} MiB, compiled in {time.perf_counter() - t0:.1f} s")
        for b in args.batches:
            bar.set_postfix_str(f"{model_name} batch {b}")
            secs, ref, acc = bench(runs[b], params, cfg, prompts[b], refs.get(b), args.prompt_len,
                                   args.tokens, args.max_len)
            if linear == "bf16":
                refs[b] = ref
            cos, top1 = acc or (None, None)
            rows.append(Row(model_name, b, b * args.tokens / secs, 1e3 * secs / args.tokens, cosine=cos, top1=top1))
            bar.update(1)
        del params, runs  # frees an NVFP4 model before the next one is made
    bar.close()
    report(rows, notes, args, name)
    print(f"total time {time.perf_counter() - start:.1f} s")
    return rows


if __name__ == "__main__":
    main()
