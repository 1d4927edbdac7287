"""Where programmatic dependent launch (PDL) acts under XLA: between the launches
of separate custom calls, or only between launches one custom call makes?

Times 64 launches of the read-floor kernel (csrc/cuda/bench_stream.cu,
`jaxfp4_bench_stream_read`, which launches once per output element) in one
jitted function: as 64 separate custom calls, or as 8 calls of 8 launches
each, each call on its own buffer (so XLA cannot merge them). Run it twice,
with JAXFP4_PDL=0 and =1 (read at the first launch), and with and without
XLA's command buffers (XLA_FLAGS=--xla_gpu_enable_command_buffer=) to see
which launches overlap. Wall-clock throughput of many back-to-back calls
(host dispatch is hidden: each call is >= 64 launches), best of 3, in us per
launch. benchmarks/kernel/NOTES.md (session 12) has a run and what it showed.

Usage: python benchmarks/pdl_capture.py [--sizes-mb 2,9,64]   (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxfp4


def us_per_launch(nbytes: int, per_call: int, calls: int, reps: int) -> float:
    rng = np.random.default_rng(0)
    xs = [jax.device_put(rng.integers(0, 256, nbytes, dtype=np.uint8)) for _ in range(calls)]
    call = jax.ffi.ffi_call("jaxfp4_bench_stream_read", jax.ShapeDtypeStruct((per_call,), jnp.float32))
    f = jax.jit(lambda *xs: [call(x, early=np.int32(1)) for x in xs])  # loads before the wait
    for _ in range(2):
        jax.block_until_ready(f(*xs))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(*xs)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps / (calls * per_call) * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", default="2,9,64", help="buffer sizes (MB) a launch streams")
    args = ap.parse_args()
    info = jaxfp4.backend_info()
    if not info["cuda_build"] or not any(d.platform == "gpu" for d in jax.devices()):
        raise SystemExit("pdl_capture.py needs a CUDA GPU and a jaxfp4 build with CUDA kernels")
    print(f"device {jax.devices()[0].device_kind}; pdl {info['pdl']}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| MB | 64 separate calls (us / launch) | 8 calls x 8 launches (us / launch) |")
    print("|---:|---:|---:|")
    for mb in (int(s) for s in args.sizes_mb.split(",")):
        reps = max(10, 400 // max(mb, 1))
        sep = us_per_launch(mb << 20, 1, 64, reps)
        chain = us_per_launch(mb << 20, 8, 8, reps)
        print(f"| {mb} | {sep:.2f} | {chain:.2f} |")


if __name__ == "__main__":
    main()
