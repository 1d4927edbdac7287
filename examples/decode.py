"""Greedy decoding with a Llama-style model in bf16 and NVFP4 (W4A16, W4A4):
tokens/s, time per output token, and how close the NVFP4 logits stay to bf16.

    python examples/decode.py                          # GPU: llama-3.1-8b; CPU: tiny
    python examples/decode.py --config tiny --batches 1,4 --tokens 16 --models bf16,nvfp4-w4a16
    python examples/decode.py --checkpoint /models/Llama-3.1-8B-Instruct-FP4 [--no-fuse]
    python examples/decode.py --models bf16,nvfp4-w4a4 --dynamic-act-scale
    python examples/decode.py --lm-head bf16           # keep the NVFP4 models' lm_head bf16

The model and its weights are in llama.py, next to this file: all models run the
same flax module, only the projections differ (bf16 or NVFP4), fused into
qkv_proj and gate_up_proj unless --no-fuse. Weights are random (default; the
NVFP4 models quantize the same bf16 weights) or, with --checkpoint DIR
(ModelOpt or compressed-tensors NVFP4), the checkpoint's: the NVFP4 models use
its quantized linears and the bf16 baseline their dequantized values, so the
models differ only in kernels and (W4A4) activation quantization.

The NVFP4 models' lm_head (--lm-head) is NVFP4 (a W4A16 jaxfp4.matmul, float32
logits; in the W4A4 model too, which needs no input scale for it) or bf16.
auto (the default): with --checkpoint the checkpoint's choice (its quantized
lm_head used as stored, exactly; bf16 if it stores the lm_head in bf16), with
random weights nvfp4 (every projection NVFP4). Tied embeddings: the NVFP4
lm_head is a quantized copy of the table; the token lookup stays bf16. The
bf16 baseline keeps a bf16 lm_head (a checkpoint's quantized one dequantized).

With fused projections and neighbours, the NVFP4 gate_up_proj's SwiGLU is its
epilogue (its weight rows interleaved by jaxfp4.interleave_gate_up), qkv_proj's
RoPE and KV-cache writes are its epilogue (jaxfp4.RotaryKVCache; its heads'
halves interleaved by jaxfp4.interleave_rotary), and each
layer's o_proj, gate_up_proj, down_proj and the next layer's qkv_proj run as
one jaxfp4.matmul_chain (on the GPU at batch 1 one custom call whose GEMMs
overlap each other's start and end; --no-chain: separate ops, the same values). Every model's decode-step attention (--attention) is cuDNN's
fused kernel on a GPU (jax.nn.dot_product_attention) and XLA's einsums and
softmax elsewhere.

W4A4 activation scales are STATIC by default, as in deployed NVFP4 models (a
fixed g_a per projection, ModelOpt's `input_scale`: one quantize launch, no
amax pass): the checkpoint's if all its linears have one, else calibrated
(llama.calibrate) over the batches' random token rows plus --calib-seqs random
sequences. --dynamic-act-scale computes g_a from every activation's amax on the fly.
One function is compiled per (model, batch): a jitted lax.fori_loop over decode
steps (one token each, a static-length KV cache, donated). The prompt runs
through the same loop with its tokens forced (prefill); then only the decode
loop is timed. Accuracy: each NVFP4 model is fed the bf16 model's tokens
(prompt and generated, teacher-forced) and its logits at every position are
compared with bf16's (mean cosine similarity, top-1 agreement; an NVFP4
lm_head's quantization included). With random weights the logits are flat, so
top-1 flips on near-ties more than it would with a trained model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

import jaxfp4

sys.path.insert(0, str(Path(__file__).resolve().parent))  # llama.py, from any cwd or when loaded by path
from llama import (CONFIGS, Config, Decoder, Params, Scales, calibrate, checkpoint_params,  # noqa: E402
                   init_cache, nvfp4_params, parts, random_params)
from llama import RMSNorm, hf_name  # noqa: E402,F401  (re-exported: the tests reach them through this module)

MODELS = {"bf16": "bf16", "nvfp4-w4a16": "w4a16", "nvfp4-w4a4": "w4a4"}  # name -> linear


def lm_head(args: argparse.Namespace, cfg: Config, ckpt: Any) -> tuple[str, str]:
    """(the NVFP4 models' lm_head, "bf16" or "nvfp4" (Decoder.head); its header line).
    --lm-head auto: a checkpoint's own choice (nvfp4 if it stores a quantized
    lm_head, else bf16); random weights: nvfp4, every projection NVFP4."""
    stored = ckpt is not None and "lm_head" in ckpt.linears  # a quantized lm_head
    head = args.lm_head
    if head == "auto":
        head = "nvfp4" if ckpt is None or stored else "bf16"
    if head == "bf16":
        return head, "lm_head: bf16" + (" (the checkpoint's quantized lm_head, dequantized)" if stored else "")
    source = ("the checkpoint's, as stored" if stored else "a quantized copy of the tied embedding"
              if cfg.tie_embeddings else "the bf16 lm_head quantized")
    w4a4 = "; the W4A4 model's too (weight-only: no input scale)" if "nvfp4-w4a4" in args.models else ""
    return head, f"lm_head: nvfp4 (w4a16, {source}){w4a4}"


# ---- static activation scales ----------------------------------------------------------

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
    p.add_argument("--no-fuse-neighbours", dest="fuse_neighbours", action="store_false",
                   help="the NVFP4 models run their RMSNorms, SwiGLU, residual adds, RoPE and KV-cache writes as "
                   "separate ops (default: passed to the projections, jaxfp4.matmul's prologue, residual and "
                   "epilogue)")
    p.add_argument("--dynamic-act-scale", action="store_true", help="W4A4: dynamic activation global "
                   "scales (an amax pass per projection), not static ones (the checkpoint's or calibrated)")
    p.add_argument("--calib-seqs", type=int, default=4, help="extra random sequences to calibrate on")
    p.add_argument("--no-chain", dest="chain", action="store_false",
                   help="the NVFP4 models' o_proj, gate_up_proj and down_proj as separate jaxfp4 ops "
                   "(default: one jaxfp4.matmul_chain; needs fused projections and neighbours)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), default="auto",
                   help="every model's decode-step attention: XLA einsums and softmax, or cuDNN's fused "
                   "kernel (jax.nn.dot_product_attention); auto: cudnn on a GPU, else xla")
    p.add_argument("--lm-head", choices=("auto", "bf16", "nvfp4"), default="auto",
                   help="the NVFP4 models' lm_head: nvfp4 (W4A16) or bf16; auto: the checkpoint's "
                   "(nvfp4 if it stores a quantized lm_head), with random weights nvfp4")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if unknown := set(args.models.split(",")) - set(MODELS):
        p.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    args.models = [m for m in MODELS if m in args.models.split(",")]  # bf16 first: the reference
    if args.attention == "auto":
        args.attention = "cudnn" if gpu else "xla"
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
    print("NVFP4 models: RMSNorms, SwiGLU, residual adds" + (", RoPE and KV-cache writes" if fused else "") + " " +
          ("in the projections (jaxfp4.matmul prologue/residual/epilogue)" if args.fuse_neighbours
           else "as separate ops (--no-fuse-neighbours)") +
          ("; o_proj + MLP + the next qkv_proj as one jaxfp4.matmul_chain"
           if args.fuse_neighbours and fused and args.chain else ""))
    print(f"attention (decode steps, every model): {args.attention}")
    head, how = lm_head(args, cfg, ckpt)
    print(how)
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
        if linear == "bf16":  # the baseline: bf16 lm_head whatever --lm-head says
            params, model = base, Decoder(cfg, linear, fused=fused, attention=args.attention)
        else:
            params = nvfp4_params(cfg, base, linear, packing, ckpt, scales if static else None, head)
            model = Decoder(cfg, linear, packing, static, fused, args.fuse_neighbours, attention=args.attention,
                            chain=args.chain, head=head)
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
