"""Where a decode token's time goes: the GPU kernels of one jitted decode loop
of examples/decode.py's model, from a jax.profiler trace, summed per kernel
name and divided by the tokens decoded.

    python benchmarks/decode_profile.py                        # llama-3.1-8b, batch 1, all models
    python benchmarks/decode_profile.py --models w4a16 --batch 16 --top 30

Per model it prints the loop's wall time per token (under the profiler, so a
little above decode.py's), the GPU busy time per token, kernels per token, and
the kernels that take the most time. On the CPU backend the trace holds no GPU
activity and only the wall time is printed.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import decode  # noqa: E402  (examples/decode.py: generate loop and buffers)
from llama import CONFIGS, Decoder, calibrate, nvfp4_params, random_params  # noqa: E402


def gpu_events(trace_dir: str) -> list[tuple[int, str, float]]:
    """(start ns, kernel name, duration us) of the GPU activity in the trace under
    trace_dir, in start order."""
    files = list(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        return []
    data = jax.profiler.ProfileData.from_file(str(files[0]))
    events = []
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if "Stream" in line.name:
                    events += [(e.start_ns, e.name, e.duration_ns / 1e3) for e in line.events]
    return sorted(events)


def gemm_roles(events: list[tuple[int, str, float]], n_tokens: int, layers: int) -> list[tuple[str, float]]:
    """Median time (us) of each NVFP4 GEMM of a token by its place in the layer
    (qkv, o, gate_up, down; then the lm_head), from the jaxfp4 GEMM launches in
    start order (whatever kernel each ran): a token runs 4 per layer and one
    lm_head (fused projections). Empty if the launches do not add up to that."""
    per_token = 4 * layers + 1
    times = [d for _, name, d in events if "sm90_gemm" in name]
    if not times or len(times) != per_token * n_tokens:
        return []
    kinds: list[list[float]] = [[] for _ in range(5)]
    for i, d in enumerate(times):
        pos = i % per_token
        kinds[4 if pos == per_token - 1 else pos % 4].append(d)
    return [(n, statistics.median(v)) for n, v in zip(("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                        "lm_head"), kinds)]


def print_layer_sequence(events: list[tuple[int, str, float]]) -> None:
    """The kernels between the 5th and 9th jaxfp4 GEMM launches (one decoder layer
    with fused projections: its qkv_proj up to the next layer's), in order, with
    their durations and the idle gap before each."""
    gemms = [i for i, (_, name, _) in enumerate(events) if "sm90_gemm" in name]
    if len(gemms) < 9:
        print("  (fewer than 9 NVFP4 GEMM launches: no layer sequence)")
        return
    print("  one layer, in launch order (gap before, duration, kernel):")
    prev_end = None
    for start, name, us in events[gemms[4]:gemms[8]]:
        gap = 0.0 if prev_end is None else (start - prev_end) / 1e3
        print(f"    {gap:6.2f} us gap  {us:7.2f} us  {name[:110]}")
        prev_end = start + us * 1e3


def main(argv: list[str] | None = None) -> None:
    gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama-3.1-8b" if gpu else "tiny")
    p.add_argument("--models", default="bf16,w4a16,w4a4", help="subset of bf16,w4a16,w4a4 (W4A4: static scales)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16, help="decode steps traced")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--top", type=int, default=20, help="kernels listed per model")
    p.add_argument("--sequence", action="store_true",
                   help="also list, in launch order, the kernels of one decoder layer (the second layer of "
                        "the first traced token: from its first NVFP4 GEMM to the next layer's)")
    p.add_argument("--no-fuse-neighbours", dest="fuse_neighbours", action="store_false",
                   help="norms, SwiGLU and residual adds as separate ops (as examples/decode.py's flag)")
    p.add_argument("--hlo", metavar="DIR", help="also write each model's compiled HLO (text) into DIR")
    p.add_argument("--no-chain", dest="chain", action="store_false",
                   help="o_proj + MLP as separate ops (as examples/decode.py --no-chain)")
    p.add_argument("--attention", choices=("xla", "cudnn"), default="cudnn" if gpu else "xla",
                   help="decode-step attention (as examples/decode.py --attention)")
    p.add_argument("--lm-head", choices=("bf16", "nvfp4"), default="nvfp4",
                   help="the NVFP4 models' lm_head (as examples/decode.py --lm-head; random weights: nvfp4)")
    args = p.parse_args(argv)
    cfg, b, n, start = CONFIGS[args.config], args.batch, args.tokens, args.prompt_len
    max_len = start + n + 1
    packing = "sm90" if gpu else None
    base = random_params(cfg, 0, True)
    prompt = jax.random.randint(jax.random.key(1), (b, max_len), 0, cfg.vocab, jnp.int32)
    models = args.models.split(",")
    scales = calibrate(cfg, base, prompt, True) if "w4a4" in models else None
    i32 = jnp.int32
    for lin in models:
        head = "bf16" if lin == "bf16" else args.lm_head
        params = base if lin == "bf16" else nvfp4_params(cfg, base, lin, packing, None, scales if lin == "w4a4" else None,
                                                         head)
        model = Decoder(cfg, lin, packing, lin == "w4a4", True, args.fuse_neighbours, attention=args.attention,
                        chain=args.chain, head=head)
        run = decode.compile_all(decode.make_generate(model), params, cfg, [b], max_len)[b]
        if args.hlo:
            Path(args.hlo).mkdir(parents=True, exist_ok=True)
            (Path(args.hlo) / f"{args.config}_{lin}_batch{b}.hlo.txt").write_text(run.as_text())

        def prefill():
            state = run(params, *decode.buffers(cfg, b, max_len, prompt), i32(start), i32(0), i32(start))
            return jax.block_until_ready(state)

        jax.block_until_ready(run(params, *prefill(), i32(start), i32(start), i32(start + n)))  # warm
        state = prefill()
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                jax.block_until_ready(run(params, *state, i32(start), i32(start), i32(start + n)))
                wall = time.perf_counter() - t0
            events = gpu_events(d)
        kernels: dict[str, list[float]] = collections.defaultdict(list)
        for _, name, us in events:
            kernels[name].append(us)
        busy = sum(sum(v) for v in kernels.values())
        count = sum(len(v) for v in kernels.values())
        print(f"\n## {lin}, batch {b}: wall {1e3 * wall / n:.3f} ms/token (profiled); "
              f"GPU busy {busy / n / 1e3:.3f} ms/token; {count / n:.0f} kernels/token")
        roles = gemm_roles(events, n, cfg.layers) if lin != "bf16" else []
        if roles:
            print("  NVFP4 GEMMs, median us by projection: " + ", ".join(f"{r} {us:.2f}" for r, us in roles))
        if args.sequence and lin != "bf16":
            print_layer_sequence(events)
        for name, us in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
            print(f"  {sum(us) / n:9.1f} us/token  {len(us) / n:6.1f}/token  {sum(us) / len(us):8.2f} us each  "
                  f"{name[:100]}")
        del params, run, state


if __name__ == "__main__":
    main()
