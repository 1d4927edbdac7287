"""The Llama-style model that examples/decode.py runs, and its weights.

One flax module (Decoder) for every model; only the projections differ
(`linear`: "bf16" is nn.Dense, "w4a16"/"w4a4" jaxfp4.flax.Dense) and the lm_head
(`head`: "bf16" an einsum against the bf16 table, "nvfp4" a W4A16
jaxfp4.flax.Dense with float32 logits; with tied embeddings a quantized copy
of the table); embeddings
(the token lookup) and norms stay bf16. Fused (the default), the projections
that share an input have their weights concatenated along the outputs: qkv_proj
(split into q, k, v) and gate_up_proj (gate, up): fewer, larger GEMMs and, for
W4A4, fewer activation quantizations. With fuse_neighbours (the default) the
NVFP4 projections take the layer's RMSNorms and SwiGLU as prologues and its
residual adds (jaxfp4.matmul's prologue and residual: in the GEMM kernel on the
GPU at decode batch sizes); the same model as the separate ops, which the bf16
model runs; chained (the default with both), o_proj, gate_up_proj, down_proj and
the next layer's qkv_proj are one jaxfp4.matmul_chain. `attention`: a decode step's attention over the KV
cache as XLA einsums and softmax, or cuDNN's fused kernel (GPU). Weights: random_params (scaled normal,
made on the device per projection; fused or not, the same bf16 model),
checkpoint_params (a jaxfp4.checkpoint's linears dequantized, the bf16
baseline; its parts concatenate exactly only if their global scales are equal,
so it is fused only if they are everywhere) and nvfp4_params (the bf16 weights
quantized, or the checkpoint's quantized linears; with head="nvfp4" the lm_head
too: the checkpoint's quantized one as stored, else the bf16 table quantized).
calibrate: W4A4 static input scales, as ModelOpt calibrates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

import jaxfp4
import jaxfp4.flax as jfx

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


def deinterleave_rotary(y: jax.Array, head_dim: int) -> jax.Array:
    """The plain [q | k | v] order of a qkv output [..., N] from a weight made by
    jaxfp4.interleave_rotary (its inverse along the last axis)."""
    *lead, n = y.shape
    t = y.reshape(*lead, n // head_dim, head_dim // 16, 2, 8)  # as interleaved: [head, block, half, 8]
    return jnp.swapaxes(t, -3, -2).reshape(*lead, n)


def rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """Rotates x [B, S, H, D] by position (the half-split layout of HF Llama)."""
    ang = positions[:, None].astype(jnp.float32) * freqs[None]  # [S, D/2]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm; `spec()` is the norm as a jaxfp4.RMSNorm, which an
    NVFP4 projection applies as its prologue (and which computes __call__)."""
    dim: int
    eps: float

    def setup(self) -> None:
        self.weight = self.param("weight", nn.initializers.ones, (self.dim,), jnp.bfloat16)

    def spec(self) -> jaxfp4.RMSNorm:
        return jaxfp4.RMSNorm(self.weight, self.eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.spec()(x)


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
    # The norms, the SwiGLU and the residual adds passed to the NVFP4 projections
    # (jaxfp4.matmul's prologue and residual: inside the GEMM kernel on the GPU
    # at decode batch sizes); False, or bf16: as separate ops. The same model.
    fuse_neighbours: bool = True
    # Decode steps' attention over the KV cache: "xla" (einsums and a softmax: four
    # kernels) or "cudnn" (jax.nn.dot_product_attention's fused kernel, GPU only).
    attention: str = "xla"
    chain: bool = True  # o_proj + MLP as one jaxfp4.matmul_chain where it can (see chained)

    def settings(self) -> dict[str, Any]:
        return dict(cfg=self.cfg, linear=self.linear, packing=self.packing,
                    static_input_scale=self.static_input_scale, fused=self.fused,
                    fuse_neighbours=self.fuse_neighbours, attention=self.attention, chain=self.chain)

    def chained(self) -> bool:
        """Whether a layer's o_proj, gate_up_proj, down_proj and the next layer's
        qkv_proj run as one jaxfp4.matmul_chain (NVFP4 with its neighbours fused, one static input
        scale each for W4A4): on the GPU at batch 1 one custom call whose GEMMs
        overlap their neighbours' start and end; elsewhere the same ops as
        separate calls."""
        return (self.chain and self.linear != "bf16" and self.fuse_neighbours and self.fused
                and (self.linear == "w4a16" or self.static_input_scale))

    def rotary_qkv(self) -> bool:
        """Whether qkv_proj's weight has its heads' halves interleaved (nvfp4_params:
        jaxfp4.interleave_rotary), the order of its RotaryKVCache epilogue: the fused
        NVFP4 models' qkv_proj without a bias."""
        return self.linear != "bf16" and self.fused and not any(p in self.cfg.bias for p in FUSED["qkv_proj"])

    def apply_proj(self, name: str, features: int, x: jax.Array, prologue: Any = None,
                   residual: jax.Array | None = None, epilogue: Any = None) -> jax.Array:
        """residual + epilogue(proj(prologue(x))): one jaxfp4 Dense call, or separate ops."""
        layer = self.proj(name, features)
        if self.linear != "bf16" and self.fuse_neighbours:
            return layer(x, prologue=prologue, residual=residual, epilogue=epilogue)
        y = layer(prologue(x) if prologue is not None else x)
        y = y if epilogue is None else epilogue(y)
        return y if residual is None else residual + y

    def projs(self, name: str, x: jax.Array, *features: int, prologue: Any = None) -> list[jax.Array]:
        """The outputs of FUSED[name]'s parts (of these features) for input prologue(x)."""
        if not self.fused:
            return [self.apply_proj(part, n, x, prologue) for part, n in zip(FUSED[name], features)]
        return jnp.split(self.apply_proj(name, sum(features), x, prologue), np.cumsum(features[:-1]), axis=-1)

    def proj(self, name: str, features: int) -> nn.Module:
        bias = any(part in self.cfg.bias for part in FUSED.get(name, (name,)))
        if self.linear == "bf16":
            return nn.Dense(features, use_bias=bias, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                            name=name)
        return jfx.Dense(features, use_bias=bias, mode=self.linear, dtype=jnp.bfloat16,
                         weight_packing=self.packing, static_input_scale=self.static_input_scale,
                         name=name)


class Attention(Projections):
    """x + attention(norm(x)), and the updated cache."""

    def rotary(self, positions: jax.Array, kv: tuple[jax.Array, jax.Array]) -> jaxfp4.RotaryKVCache | None:
        """qkv_proj's epilogue where its weight is interleaved for it and its neighbours
        are fused (RoPE and the cache writes in the GEMM's store on the GPU), else None."""
        if not (self.rotary_qkv() and self.fuse_neighbours and kv is not None):
            return None
        cos, sin = jaxfp4.rope_tables(positions, inv_freq(self.cfg))
        return jaxfp4.RotaryKVCache(cos, sin, positions, *kv, heads=self.cfg.heads)

    @nn.compact
    def __call__(self, x: jax.Array, norm: jaxfp4.RMSNorm, positions: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None, chained: bool = False,
                 qkv: Any = None, qkv_link: bool = False) -> Any:
        """(x + o_proj(attention), cache); chained: (attention, cache, o_proj's chain link).
        qkv: the fused qkv_proj(norm(x)) if already computed (the previous layer's chain
        link; with the rotary epilogue its (q, k_cache, v_cache)); qkv_link: only return
        that link (qkv_proj with the norm as prologue, and the epilogue for this positions
        and kv)."""
        c = self.cfg
        sizes = tuple(n * c.head_dim for n in (c.heads, c.kv_heads, c.kv_heads))
        epilogue = self.rotary(positions, kv)
        if qkv_link:
            return self.proj("qkv_proj", sum(sizes)).link(c.hidden, prologue=norm, epilogue=epilogue)
        b, s, _ = x.shape
        if epilogue is not None:  # q rotated, the caches written by qkv_proj's epilogue
            if qkv is None:
                qkv = self.apply_proj("qkv_proj", sum(sizes), x, norm, epilogue=epilogue)
            q, *kv = qkv
            q, kv = q.reshape(b, s, -1, c.head_dim), tuple(kv)
            k, v = kv
            key_pos = jnp.arange(k.shape[1])
        else:
            if qkv is None and self.rotary_qkv():
                qkv = self.apply_proj("qkv_proj", sum(sizes), x, norm)
            if qkv is not None:
                qkv = deinterleave_rotary(qkv, c.head_dim) if self.rotary_qkv() else qkv
                parts = jnp.split(qkv, np.cumsum(sizes[:-1]), axis=-1)
            else:
                parts = self.projs("qkv_proj", x, *sizes, prologue=norm)
            q, k, v = (y.reshape(b, s, -1, c.head_dim) for y in parts)
            freqs = inv_freq(c)
            q, k = rope(q, positions, freqs), rope(k, positions, freqs)
            if kv is None:  # no cache: attend to this call's tokens
                key_pos = positions
            else:  # write this call's keys/values at their positions, attend to the whole cache
                start = (0, positions[0], 0, 0)
                kv = (lax.dynamic_update_slice(kv[0], k, start), lax.dynamic_update_slice(kv[1], v, start))
                k, v = kv
                key_pos = jnp.arange(k.shape[1])
        if kv is not None and s == 1 and self.attention == "cudnn":  # a decode step: keys 0 .. position
            lens = jnp.full((b,), positions[0] + 1, jnp.int32)
            out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens, implementation="cudnn")
            return self.output(out.reshape(b, s, c.heads * c.head_dim), x, kv, chained)
        q = q.reshape(b, s, c.kv_heads, c.heads // c.kv_heads, c.head_dim)  # grouped-query
        scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
        mask = key_pos[None, :] <= positions[:, None]  # causal, by position: [S, T]
        scores = jnp.where(mask, scores / math.sqrt(c.head_dim), -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, s, c.heads * c.head_dim)
        return self.output(out, x, kv, chained)

    def output(self, out: jax.Array, x: jax.Array, kv: Any, chained: bool) -> tuple[Any, ...]:
        c = self.cfg
        if chained:
            return out, kv, self.proj("o_proj", c.hidden).link(c.heads * c.head_dim, residual=x)
        return self.apply_proj("o_proj", c.hidden, out, residual=x), kv


class MLP(Projections):
    """x + mlp(norm(x)): SwiGLU (float32 inside). The fused NVFP4 model's
    gate_up_proj weight is jaxfp4.interleave_gate_up(gate, up) (nvfp4_params),
    whose output's SwiGLU is its epilogue (jaxfp4.InterleavedSwiGLU: in the
    GEMM's store on the GPU); the bf16 model's is [gate | up] (jaxfp4.SwiGLU)."""

    @nn.compact
    def __call__(self, x: jax.Array, norm: jaxfp4.RMSNorm, links: bool = False) -> Any:
        """x + mlp(norm(x)); links: gate_up_proj's and down_proj's chain links
        instead, down_proj's residual link 0 (the chain's o_proj: x)."""
        c = self.cfg
        swiglu = jaxfp4.InterleavedSwiGLU()
        if links:
            return [self.proj("gate_up_proj", 2 * c.ffn).link(c.hidden, prologue=norm, epilogue=swiglu),
                    self.proj("down_proj", c.hidden).link(c.ffn, residual=0)]
        if self.fused and self.linear != "bf16":  # the SwiGLU in gate_up_proj's epilogue
            act = self.apply_proj("gate_up_proj", 2 * c.ffn, x, norm, epilogue=swiglu)
            return self.apply_proj("down_proj", c.hidden, act, residual=x)
        if self.fused:  # down_proj takes gate_up_proj's [gate | up] through its prologue
            gate_up = self.apply_proj("gate_up_proj", 2 * c.ffn, x, norm)
            return self.apply_proj("down_proj", c.hidden, gate_up, jaxfp4.SwiGLU(), residual=x)
        gate, up = self.projs("gate_up_proj", x, c.ffn, c.ffn, prologue=norm)
        return self.apply_proj("down_proj", c.hidden, jaxfp4.SwiGLU()(jnp.concatenate([gate, up], -1)),
                               residual=x)


class Block(Projections):
    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, kv: Any, qkv: Any = None,
                 next_qkv: jaxfp4.Link | None = None, qkv_link: bool = False) -> Any:
        """(x, cache, the next layer's qkv or None). Chained: o_proj, the MLP and (given
        next_qkv, the next layer's qkv_proj link) one jaxfp4.matmul_chain; qkv: this
        layer's qkv_proj output from the previous layer's chain. qkv_link: only return
        this layer's qkv_proj link (for the previous layer's chain; with its RoPE and
        cache writes as epilogue for these positions and kv)."""
        kw, c = self.settings(), self.cfg
        attn, mlp = Attention(**kw, name="self_attn"), MLP(**kw, name="mlp")
        norm1 = RMSNorm(c.hidden, c.norm_eps, name="input_layernorm").spec()
        if qkv_link:
            return attn(None, norm1, positions, kv, qkv_link=True)
        norm2 = RMSNorm(c.hidden, c.norm_eps, name="post_attention_layernorm").spec()
        if self.chained():  # x + o_proj(attention), then the MLP with its residual, as one chain
            out, kv, o_link = attn(x, norm1, positions, kv, chained=True, qkv=qkv)
            outs = jaxfp4.matmul_chain(out, [o_link, *mlp(x, norm2, links=True), *([next_qkv] if next_qkv else [])])
            return outs[2], kv, outs[3] if next_qkv else None
        x, kv = attn(x, norm1, positions, kv)
        return mlp(x, norm2), kv, None


class Decoder(Projections):
    """tokens [B, S] at positions [S] -> (logits float32 [B, S, vocab], cache).
    With cache=None it is a plain causal forward over the S tokens.

    An NVFP4 lm_head is W4A16 even in a W4A4 model: it needs no calibrated input
    scale, and at decode batch sizes its time goes to reading the weight, which
    4-bit activations would not shorten."""
    head: str = "bf16"  # the lm_head: "bf16" (Embed.attend) | "nvfp4" (a W4A16 jaxfp4.flax.Dense)

    def setup(self) -> None:
        c = self.cfg
        self.embed_tokens = Embed(c.vocab, c.hidden)  # the lookup stays bf16, tied or not
        self.layers = [Block(**self.settings()) for _ in range(c.layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c.hidden, c.norm_eps)
        if self.head == "nvfp4":  # tied: a quantized copy of embed_tokens' table
            # float32 logits (bf16 ones would turn near-equal tokens into ties), from
            # the GEMM's float32 accumulator on the kernel's fast bf16 path.
            self.lm_head = jfx.Dense(c.vocab, mode="w4a16", dtype=jnp.bfloat16, out_dtype=jnp.float32,
                                     weight_packing=self.packing)
        elif not c.tie_embeddings:
            self.lm_head = Embed(c.vocab, c.hidden)

    def __call__(self, tokens: jax.Array, positions: jax.Array,
                 cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        x = self.embed_tokens(tokens)
        new_cache, qkv = [], None
        # Chained (and qkv_proj without a bias, which a link cannot add): the next layer's
        # qkv_proj is this layer's chain's last link (its weights stream in while down_proj finishes).
        link_qkv = self.chained() and not any(p in self.cfg.bias for p in FUSED["qkv_proj"])
        for i, layer in enumerate(self.layers):
            nxt = (self.layers[i + 1](None, positions, None if cache is None else cache[i + 1], qkv_link=True)
                   if link_qkv and i + 1 < len(self.layers) else None)
            x, kv, qkv = layer(x, positions, None if cache is None else cache[i], qkv=qkv, next_qkv=nxt)
            new_cache.append(kv)
        if self.head == "nvfp4" and self.fuse_neighbours:
            logits = self.lm_head(x, prologue=self.norm.spec())
        elif self.head == "nvfp4":
            logits = self.lm_head(self.norm(x))
        else:
            logits = (self.embed_tokens if self.cfg.tie_embeddings else self.lm_head).attend(self.norm(x))
        return logits, None if cache is None else new_cache


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


def interleave_attn(layer: Params, cfg: Config) -> Params:
    """A fused layer's bf16 params with qkv_proj's kernel [K, q | k | v] in
    jaxfp4.interleave_rotary's order (each head's halves interleaved: the order of
    its RotaryKVCache epilogue); with a bias, or unfused, as they are."""
    attn = layer.get("self_attn", {})
    if "qkv_proj" not in attn or "bias" in attn["qkv_proj"]:
        return layer
    qkv = {"kernel": jaxfp4.interleave_rotary(attn["qkv_proj"]["kernel"], cfg.head_dim, axis=-1)}
    return {**layer, "self_attn": {**attn, "qkv_proj": qkv}}


def interleave_mlp(layer: Params) -> Params:
    """A fused layer's bf16 params with gate_up_proj's kernel [K, gate | up]
    (and bias) interleaved as jaxfp4.interleave_gate_up orders the NVFP4 model's
    rows (the order its SwiGLU epilogue pairs); unfused layers as they are."""
    mlp = layer.get("mlp", {})
    if "gate_up_proj" not in mlp:
        return layer
    gate_up = {name: jaxfp4.interleave_gate_up(*jnp.split(x, 2, axis=-1), axis=-1)
               for name, x in mlp["gate_up_proj"].items()}
    return {**layer, "mlp": {**mlp, "gate_up_proj": gate_up}}


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


def nvfp4_head(params: Params, packing: str | None, ckpt: Any = None) -> dict[str, jax.Array]:
    """The params of the NVFP4 lm_head (a jaxfp4.flax.Dense): the checkpoint's
    quantized lm_head as stored (exact, not the dequantized table of the bf16
    baseline) if it has one, else the bf16 lm_head quantized (tied: a quantized
    copy of embed_tokens' table)."""
    if ckpt is not None and "lm_head" in ckpt.linears:
        return jfx.dense_params(ckpt.linears["lm_head"].weight, packing=packing)
    table = params["lm_head" if "lm_head" in params else "embed_tokens"]["weight"]
    quantize = jax.jit(lambda t: jfx.dense_params(jaxfp4.quantize(t, sf_layout="linear"), packing=packing))
    return quantize(table)


def nvfp4_params(cfg: Config, params: Params, mode: str, packing: str | None, ckpt: Any = None,
                 input_scales: Scales | None = None, head: str = "bf16") -> Params:
    """The NVFP4 model's params (fused like the bf16 `params`): without a
    checkpoint jaxfp4.flax.quantize_params of the bf16 params (every nn.Dense
    kernel quantized; jitted, one layer at a time), else dense_params of the
    checkpoint's linears (a fused one: concat_rows of its parts). A fused
    gate_up_proj's rows are gate's and up's interleaved (interleave_mlp), the
    order of MLP's SwiGLU epilogue; a fused qkv_proj without a bias has its heads'
    halves interleaved (interleave_attn), the order of its RotaryKVCache epilogue. The other
    tensors, biases included, are shared with `params` (no copy). W4A4 with
    static activation scales: `input_scales` {projection path: g_a} are added.
    head="nvfp4" (Decoder.head): the lm_head is nvfp4_head's, else the bf16 one."""
    if ckpt is None:
        quantize = jax.jit(lambda layer: jfx.quantize_params(interleave_attn(interleave_mlp(layer), cfg), mode=mode,
                                                             packing=packing))
        out = traverse_util.flatten_dict({k: quantize(v) if k.startswith("layers_") else v
                                          for k, v in params.items()})
    else:
        flat = traverse_util.flatten_dict(params)
        out = {path: x for path, x in flat.items() if path[-1] != "kernel"}
        for path in (p[:-1] for p in flat if p[-1] == "kernel"):
            ws = [lw.weight for lw in parts(ckpt, path)]
            w = jaxfp4.interleave_gate_up(*ws) if path[-1] == "gate_up_proj" else concat_rows(ws)
            if path[-1] == "qkv_proj" and (*path, "bias") not in flat:
                w = jaxfp4.interleave_rotary(w, cfg.head_dim)
            dense = jfx.dense_params(w, packing=packing)
            out.update({(*path, k): v for k, v in dense.items()})
    out.update({(*path, "input_scale"): g for path, g in (input_scales or {}).items()})
    if head == "nvfp4":  # replaces the bf16 lm_head (tied: adds one beside embed_tokens)
        out = {path: x for path, x in out.items() if path[0] != "lm_head"}
        out.update({("lm_head", k): v for k, v in nvfp4_head(params, packing, ckpt).items()})
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
