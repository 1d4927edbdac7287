"""GEMM benchmark of jaxfp4 against XLA's paths, following the shared
benchmark-protocol.md: every method timed side by side in one process on one
card, as R python-unrolled calls inside one jitted function (no host sync
between them), divided by R; the median of >= 10 runs after two warm-up runs.
On a GPU (--timing clock, the default there) each execution is bracketed by
two jaxfp4_bench_clock calls that read the GPU's %globaltimer: the time from
the first to the last is the R calls' device time, whatever the host's
dispatch costs (for R small GEMMs with several operands each the host's
dispatch of an execution is about as long as its GPU time, and host-timed runs
then measured the host: cells moved by up to ~30% between runs). Elsewhere
(--timing host) host-timed executions, as follows.
Every unrolled call gets its own activation AND its own weight copy (R copies,
far more than 2x the L2 cache): XLA merges dots that share an operand
(DotMerger) and reuses a dequantized weight across calls (CSE), which would
time one weight read for several calls. Each run enqueues the jitted function
E1 and then E2 times back to back and takes (T(E2) - T(E1)) / ((E2 - E1) R):
the host's dispatch and synchronisation latency cancels out.

Methods (out = A [M, K] @ W [N, K]^T in bfloat16):
  xla_bf16            lax.dot_general of bf16 operands
  xla_fp8             the same with float8_e4m3fn operands (cuBLASLt FP8)
  jax_scaled_matmul   jax.nn.scaled_matmul, float4_e2m1fn data + LINEAR e4m3 scales,
                      times g_a * g_b (activations quantized OUTSIDE the timed region)
  xla_dequant_dot     NVFP4 weights dequantized to bf16 by jnp ops, then a bf16 dot
  jaxfp4_w4a16        jaxfp4.matmul(bf16 activations, NVFP4 weights in checkpoint order)
  jaxfp4_w4a16_packed the same with jaxfp4.prepare_weights weights (what users and
                      examples/decode.py run: the order the GPU kernel loads fastest)
  jaxfp4_w4a4_8x4     jaxfp4.quantize(a, g_a, sf_layout="8x4") + jaxfp4.matmul, activation
                      quantization (static g_a) inside the timed region, checkpoint-order weights
  jaxfp4_w4a4_8x4_packed    the same with jaxfp4.prepare_weights weights
  jaxfp4_w4a4_128x4         ... with "128x4" activation scales, checkpoint-order weights
  jaxfp4_w4a4_128x4_packed  ... with "128x4" activation scales, prepared weights
  jaxfp4_w4a4_input_scale_packed  jaxfp4.matmul(a, w, input_scale=g_a): the same W4A4
                      product as one op (on the GPU the kernel quantizes a itself for M <= 8
                      when a's rows fit its shared memory; else quantize + W4A4), prepared weights
  read_floor          csrc/cuda/bench_stream.cu: streams the same NVFP4 weight bytes
                      (codes + scales) with 16-byte loads and an SM-sized grid; each call
                      waits for the one before it (griddepcontrol.wait) before its first
                      load, as the GEMM kernels do

Usage: python benchmarks/gemm.py [--quick] [--shapes 28672x4096,8192x8192] [--ms 1,8,32]
                                 [--methods jaxfp4_w4a16_packed,jaxfp4_w4a4_8x4_packed,read_floor]
Writes benchmarks/results/<card>.md and <card>.png.
--smoke: a few seconds on tiny shapes (CPU allowed, results to a temporary folder
unless --out): checks that the script runs, measures nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxfp4  # noqa: E402  (registers the FFI targets)
from jaxfp4 import format as fmt  # noqa: E402

FULL_SHAPES = [(28672, 4096), (8192, 8192), (10240, 8192), (4096, 14336)]
FULL_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
QUICK_SHAPES = [(28672, 4096), (8192, 8192)]
QUICK_MS = [1, 8, 16, 32, 128]
BASELINES = ("xla_bf16", "xla_fp8", "jax_scaled_matmul", "xla_dequant_dot")
JAXFP4 = ("jaxfp4_w4a16", "jaxfp4_w4a16_packed",
          "jaxfp4_w4a4_8x4", "jaxfp4_w4a4_8x4_packed",
          "jaxfp4_w4a4_128x4", "jaxfp4_w4a4_128x4_packed", "jaxfp4_w4a4_input_scale_packed")
W4A4_ONE_OP = "jaxfp4_w4a4_input_scale_packed"  # matmul(a, w, input_scale=g_a)
METHODS = BASELINES + JAXFP4
MIN_ROTATION_BYTES = 128 << 20  # > 2 x L2 on H100 (50 MB) and H200 (60 MB)
RESULTS = Path(__file__).resolve().parent / "results"
# --smoke: does the script run? (tiny shapes, R = 2, 2 runs; CPU allowed)
SMOKE_SHAPES = [(128, 256)]
SMOKE_MS = [1, 64]
SMOKE_NOTE = ("- **SMOKE RUN** (`--smoke`: tiny shapes, R = 2, 2 runs, small copy-bandwidth buffer): "
              "checks that the script runs; the numbers are NOT measurements")


def is_packed(method: str) -> bool:
    """Whether a jaxfp4 method runs on jaxfp4.prepare_weights weights."""
    return method.endswith("_packed")


def w4a4_layout(method: str) -> str | None:
    """The activation sf_layout of a W4A4 method ("jaxfp4_w4a4_8x4_packed" -> "8x4"; the one-op
    method's where it quantizes as a separate step, M <= 32), else None."""
    if method == W4A4_ONE_OP:
        return "8x4"
    return method.split("_")[2] if method.startswith("jaxfp4_w4a4_") else None


# ---- environment -----------------------------------------------------------------

def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001 - informational only
        return ""


def environment() -> dict[str, str]:
    dev = jax.devices()[0]
    smi = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    header = _sh(["nvidia-smi"])
    cuda = next((line.split("CUDA Version:")[1].split("|")[0].strip()
                 for line in header.splitlines() if "CUDA Version:" in line), "?")
    try:
        plat = dev.client.platform_version
    except Exception:  # noqa: BLE001
        plat = "?"
    head = _sh(["git", "rev-parse", "--short", "HEAD"]) or "?"
    dirty = bool(_sh(["git", "status", "--porcelain", "--untracked-files=no", "csrc", "jaxfp4"]))
    kind = dev.device_kind
    card = "h200" if "H200" in kind else "h100" if "H100" in kind else kind.lower().replace(" ", "_")
    return {"card": card, "device_kind": kind, "nvidia_smi": smi, "driver_cuda": cuda,
            "platform_version": plat, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(),
            "l2_mb": "60" if card == "h200" else "50", "git": head + (" (modified)" if dirty else "")}


def copy_bandwidth(nbytes: int = 2 << 30, runs: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    x = jax.random.bits(jax.random.key(0), (nbytes // 4,), jnp.uint32)
    f = jax.jit(lambda x: x ^ jnp.uint32(0x5A5A5A5A))
    jax.block_until_ready(f(x))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    del x
    return 2 * nbytes / statistics.median(times)


# ---- operands ----------------------------------------------------------------------

def copies(x, n: int):
    """n distinct device buffers holding x (distinct buffers: no CSE, no L2 reuse)."""
    return [x] + [jnp.array(x, copy=True) for _ in range(n - 1)]


def n_copies(nbytes: int, at_least: int = 1) -> int:
    """Copies of an operand whose total exceeds MIN_ROTATION_BYTES."""
    return max(at_least, math.ceil(MIN_ROTATION_BYTES / nbytes))


def error_note(e: BaseException) -> str:
    """A one-line note for a point that failed (the traceback too with JAXFP4_BENCH_TRACEBACK=1)."""
    if os.environ.get("JAXFP4_BENCH_TRACEBACK"):
        traceback.print_exc()
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"error: {type(e).__name__}: {first}"


def calls_for(m: int) -> int:
    """R: unrolled calls per jitted function (enough to hide dispatch for small M)."""
    return 48 if m <= 32 else 24 if m <= 256 else 8 if m <= 1024 else 4


def dequant_bf16(data, scales_linear, g):
    """What a user writes by hand: E2M1 lookup, times E4M3 scale, times g (bf16)."""
    lut = jnp.asarray(fmt.E2M1_VALUES, jnp.bfloat16)
    n, half_k = data.shape
    vals = jnp.stack([lut[data & 0xF], lut[data >> 4]], axis=-1).reshape(n, half_k // 8, 16)
    w = vals * scales_linear.astype(jnp.bfloat16)[..., None]
    return w.reshape(n, 2 * half_k) * g.astype(jnp.bfloat16)


def dot_nt(a, w, **kw):
    return lax.dot_general(a, w, (((1,), (1,)), ((), ())), **kw)


# ---- timing --------------------------------------------------------------------------

# A kernel cannot read the weights faster than the read floor streams them: a time
# under this fraction of the floor is the timing's noise (the difference of two
# host-timed batches), so the point is timed again, and the report flags it if it
# stays there.
FLOOR_SLACK = 0.95
BELOW_FLOOR_NOTE = "faster than the read floor: timing noise, not a kernel time; re-run this point"


def below_floor(us: float | None, floor_us: float | None) -> bool:
    """Whether a time (us) is impossibly fast against the read floor of the same weight."""
    return bool(us and floor_us) and us < FLOOR_SLACK * floor_us


@dataclass
class Result:
    shape: tuple[int, int]
    m: int
    method: str
    us: float | None = None
    path: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)


def _enqueue(many, args, times: int) -> float:
    """Seconds for `times` back-to-back executions (one host sync at the end: the
    executions run in order on the device, so the last one's output suffices)."""
    t0 = time.perf_counter()
    outs = [many(*args) for _ in range(times)]
    jax.tree.leaves(outs[-1])[-1].block_until_ready()
    dt = time.perf_counter() - t0
    del outs
    return dt


def _clock(*deps):
    """The GPU's %globaltimer (U32 [2]: low, high word, ns) once the stream has
    reached this point; deps only order it (jaxfp4_bench_clock, CUDA only)."""
    return jax.ffi.ffi_call("jaxfp4_bench_clock", jax.ShapeDtypeStruct((2,), jnp.uint32))(*deps)


@functools.lru_cache(maxsize=4)
def unrolled(call, r: int, nw: int, chain: bool = False, clock: bool = False):
    """The jitted function of R python-unrolled calls: call i gets acts[i] and
    weights[i % nw]. chain (--chain): call i's operands pass through an
    optimization barrier with call i-1's output, so the calls are dependent, as a
    model's are: XLA can neither run two at once nor fuse independent calls into
    one kernel (horizontal fusion of elementwise ops); the barrier costs nothing.
    (On an H100 chained and unchained rows agreed to 0.1 us: XLA runs the calls
    one after another either way.)
    clock: it also returns (t0, t1), _clock() before every call (each call's
    operands pass through a barrier with t0) and after all of them.
    Cached, so that timing a call twice (time_calls, then device_time_calls)
    compiles it once."""
    @jax.jit
    def many(acts, weights):
        t0 = _clock(*jax.tree.leaves((acts[0], weights[0]))[:1]) if clock else None
        outs = []
        for i in range(r):
            a, w = acts[i], weights[i % nw]
            if clock:
                (a, w), _ = lax.optimization_barrier(((a, w), t0))
            if chain and outs:
                (a, w), _ = lax.optimization_barrier(((a, w), outs[-1]))
            outs.append(call(a, w))
        if clock:
            return outs, t0, _clock(*jax.tree.leaves(outs))
        return outs
    return many


TIMING = {"mode": "host", "chain": False}  # main() sets them from --timing and --chain


def clock_available() -> bool:
    """Whether jaxfp4_bench_clock can time on this backend (a CUDA build on a GPU)."""
    return jax.default_backend() == "gpu" and "jaxfp4_bench_clock" in jaxfp4.backend_info()["targets"].get("cuda", [])


def _ns(t) -> int:
    lo, hi = (int(v) for v in np.asarray(t))
    return hi << 32 | lo


def clock_calls(call, acts: list, weights: list, runs: int, chain: bool = False) -> float:
    """Median device seconds per call of `call(act, weight)`, R = len(acts) unrolled
    calls in one jit, from the GPU clock read before the first and after the last."""
    r = len(acts)
    many = unrolled(call, r, len(weights), chain, clock=True)
    args = (acts, weights)
    jax.block_until_ready(many(*args))  # compile + warm up
    jax.block_until_ready(many(*args))
    times = []
    for _ in range(runs):
        _, t0, t1 = many(*args)
        times.append((_ns(t1) - _ns(t0)) * 1e-9 / r)
    return statistics.median(times)


def time_calls(call, acts: list, weights: list, runs: int, big: bool = False, chain: bool = False) -> float:
    """Median seconds per call of `call(act, weight)`, R = len(acts) unrolled calls
    in one jit (see `unrolled`): on the GPU clock with TIMING "clock", else
    host-timed executions."""
    chain = chain or TIMING["chain"]
    if TIMING["mode"] == "clock":
        return clock_calls(call, acts, weights, runs, chain)
    r = len(acts)
    many = unrolled(call, r, len(weights), chain)
    args = (acts, weights)
    jax.block_until_ready(many(*args))  # compile + warm up
    jax.block_until_ready(many(*args))
    e1, e2 = (1, 2) if big else (1, 4)
    times, whole = [], []
    for _ in range(runs):
        t1 = _enqueue(many, args, e1)
        t2 = _enqueue(many, args, e2)
        times.append((t2 - t1) / ((e2 - e1) * r))
        whole.append(t2 / (e2 * r))
    t = statistics.median(times)
    # A difference swamped by host noise (tiny calls, a busy CPU: smoke runs) can
    # come out <= 0; then report the undifferenced time per call, an upper bound.
    return t if t > 0 else statistics.median(whole)


def gpu_kernel_seconds(fn, *args) -> float | None:
    """Device seconds of one execution of fn(*args): the summed durations of the
    GPU activity (kernels, copies) in a profiler trace of it. None when the trace
    has no GPU activity (CPU backend). fn must be compiled and warm."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(*args))
        files = list(Path(d).rglob("*.xplane.pb"))
        if not files:
            return None
        data = jax.profiler.ProfileData.from_file(str(files[0]))
    ns = [e.duration_ns for plane in data.planes if plane.name.startswith("/device:GPU")
          for line in plane.lines if "Stream" in line.name for e in line.events]
    return sum(ns) * 1e-9 if ns else None


def device_time_calls(call, acts: list, weights: list, runs: int = 3, chain: bool = False) -> float | None:
    """Median device seconds per call (the GPU's busy time, without launch gaps and
    host dispatch), from profiler traces of the R-call function; None on CPU."""
    r = len(acts)
    many = unrolled(call, r, len(weights), chain)
    args = (acts, weights)
    jax.block_until_ready(many(*args))
    times = [gpu_kernel_seconds(many, *args) for _ in range(runs)]
    return statistics.median(times) / r if all(t is not None for t in times) else None


def read_floor(nbytes: int, runs: int, r: int = 32) -> float:
    """Median seconds per streaming read of `nbytes` weight bytes, r distinct
    buffers, each call loading once the previous call's kernel has finished (as
    a GEMM that reads what the kernel before it wrote must; loading before that
    measured the same to 0.1 us on an H100: the floor kernel's own ramp is short)."""
    base = jax.random.bits(jax.random.key(1), (nbytes,), jnp.uint8)
    bufs = copies(base, max(r, n_copies(nbytes, 2)))  # one buffer per call
    stream = jax.ffi.ffi_call("jaxfp4_bench_stream_read", jax.ShapeDtypeStruct((1,), jnp.float32))
    t = time_calls(lambda a, w: stream(w, early=np.int32(0)), [None] * len(bufs), bufs, runs)
    del bufs, base
    return t


# ---- one shape -----------------------------------------------------------------------

def lowering_platform() -> str:
    """The platform name jaxfp4's lowerings record ("cuda" on NVIDIA GPUs, else e.g. "cpu")."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


def lowered_gemm_path() -> str:
    return jaxfp4.backend_info()["lowered"].get(f"gemm[{lowering_platform()}]", "?")


def bench_shape(n: int, k: int, ms: list[int], methods: list[str], runs: int, allow_fallback: bool,
                log, calls=calls_for) -> list[Result]:
    """Results of `methods` at [M, K] x [N, K] for M in ms; `calls(m)` is R."""
    results: list[Result] = []
    key = jax.random.key(n * 7 + k)
    kw, ka = jax.random.split(key)
    w_bf16 = jax.random.normal(kw, (n, k), jnp.bfloat16)
    w = jaxfp4.quantize(w_bf16, sf_layout="128x4")          # NVFP4 weights (dynamic g)
    nv_bytes = fmt.nvfp4_bytes(n, k)
    r_max = max(calls(m) for m in ms)

    floor_us = None
    if "read_floor" in methods:
        try:
            t = read_floor(nv_bytes, runs, r=max(r_max, 32))
            floor_us = t * 1e6
            for m in ms:
                results.append(Result((n, k), m, "read_floor", t * 1e6, "jaxfp4_bench_stream_read",
                                      extra={"GB/s": nv_bytes / t / 1e9}))
            log(f"  read_floor: {t * 1e6:.1f} us for {nv_bytes / 1e6:.1f} MB ({nv_bytes / t / 1e9:.0f} GB/s)")
        except Exception as e:  # noqa: BLE001
            log(f"  read_floor failed: {type(e).__name__}: {str(e)[:200]}")
            results.append(Result((n, k), 0, "read_floor", None, note=f"error: {type(e).__name__}"))

    # Activations: R distinct [M, K] bf16 per M, and a static activation scale.
    acts_by_m, g_a_by_m = {}, {}
    for m in ms:
        a_keys = jax.random.split(jax.random.fold_in(ka, m), calls(m))
        acts_by_m[m] = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in a_keys]
        amax = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)))) for a in acts_by_m[m])
        g_a_by_m[m] = jnp.float32(amax / 2688.0)

    def weight_set(method: str) -> list:
        """r_max distinct weight copies (one per unrolled call) for a method."""
        if method == "xla_bf16":
            return copies(w_bf16, r_max)
        if method == "xla_fp8":
            return copies(w_bf16.astype(jnp.float8_e4m3fn), r_max)
        if method in ("jax_scaled_matmul", "xla_dequant_dot"):
            d4, s_lin, g = jaxfp4.to_scaled_matmul_operands(w)
            d = d4 if method == "jax_scaled_matmul" else w.data
            return [(a, b, g) for a, b in zip(copies(d, r_max), copies(s_lin, r_max))]
        src = jaxfp4.prepare_weights(w) if is_packed(method) else w
        return [src] + [jax.tree.map(lambda x: jnp.array(x, copy=True), src) for _ in range(r_max - 1)]

    def make_call(method: str, m: int):
        """(call(act, weight), per-call activation operands) of a method at M = m."""
        acts, g_a = acts_by_m[m], g_a_by_m[m]
        if method in ("xla_bf16", "xla_fp8"):
            dt = jnp.bfloat16 if method == "xla_bf16" else jnp.float8_e4m3fn
            return (lambda a, wb: dot_nt(a, wb, preferred_element_type=jnp.bfloat16),
                    [a.astype(dt) for a in acts])
        if method == "jax_scaled_matmul":
            def call(aq, wq):
                (ad, as_, ag), (wd, ws, wg) = aq, wq
                out = jax.nn.scaled_matmul(ad[None], wd[None], as_[None], ws[None],
                                           preferred_element_type=jnp.float32)[0]
                return (out * (ag * wg)).astype(jnp.bfloat16)
            return call, [jaxfp4.to_scaled_matmul_operands(jaxfp4.quantize(a, g_a, sf_layout="linear"))
                          for a in acts]
        if method == "xla_dequant_dot":
            return (lambda a, wq: dot_nt(a, dequant_bf16(*wq), preferred_element_type=jnp.bfloat16)), acts
        if method in ("jaxfp4_w4a16", "jaxfp4_w4a16_packed"):
            return (lambda a, wq: jaxfp4.matmul(a, wq, out_dtype=jnp.bfloat16)), acts
        if method == W4A4_ONE_OP:
            return (lambda a, wq: jaxfp4.matmul(a, wq, input_scale=g_a, out_dtype=jnp.bfloat16)), acts
        layout = w4a4_layout(method)
        return (lambda a, wq: jaxfp4.matmul(jaxfp4.quantize(a, g_a, sf_layout=layout), wq,
                                            out_dtype=jnp.bfloat16)), acts

    for method in methods:
        if method == "read_floor":
            continue
        try:
            wts = weight_set(method)
        except Exception as e:  # noqa: BLE001
            note = error_note(e)
            log(f"  {method:24s} weights FAILED {note}")
            results += [Result((n, k), m, method, None, note=note) for m in ms]
            continue
        for m in ms:
            res = Result((n, k), m, method)
            try:
                call, args = make_call(method, m)
                if method in JAXFP4:
                    # Lower once to learn the path; skip the pure-JAX fallback unless asked.
                    jax.jit(call).lower(args[0], wts[0])
                    res.path = lowered_gemm_path()
                    if res.path == "reference" and not allow_fallback:
                        res.note = "skipped: no native kernel in this build (reference fallback)"
                        results.append(res)
                        log(f"  M={m:5d} {method:24s} skipped ({res.path})")
                        continue
                t = time_calls(call, args, wts, runs, big=m > 256)
                for _ in range(2):  # (the floor is a bound for the small-M rows the report compares)
                    if not (m <= 32 and below_floor(t * 1e6, floor_us)):
                        break
                    log(f"  M={m:5d} {method:24s} {t * 1e6:10.1f} us is under the read floor: timing it again")
                    t = time_calls(call, args, wts, runs, big=m > 256)
                res.us = t * 1e6  # (the report flags it if it is still under the floor)
                log(f"  M={m:5d} {method:24s} {res.us:10.1f} us  {2 * m * n * k / t / 1e12:8.1f} TFLOP/s"
                    f"  {res.path}")
            except Exception as e:  # noqa: BLE001
                res.note = error_note(e)
                log(f"  M={m:5d} {method:24s} FAILED {res.note}")
            results.append(res)
        del wts
    return results


# ---- report ----------------------------------------------------------------------------

def tflops(m, n, k, us):
    return 2 * m * n * k / (us * 1e-6) / 1e12 if us else None


def command_lines(env: dict, bw: float, argv: str, shapes, runs_by_shape: dict | None) -> list[str]:
    """The command (and git, copy bandwidth) behind each shape: one line when this
    run made them all, else one per earlier run merged in (--merge)."""
    this = {"command": argv, "git": env["git"], "copy_tbps": round(bw / 1e12, 2), "timing": TIMING["mode"],
            "chain": TIMING["chain"]}
    runs = [(runs_by_shape or {}).get(f"{n}x{k}", this) for n, k in shapes]
    if all(r == this for r in runs):
        return [f"- command: `python benchmarks/gemm.py {argv}` (git {env['git']}; timing: {TIMING['mode']})"]
    return [f"- N={n}, K={k}: `python benchmarks/gemm.py {r['command']}` (git {r['git']}; copy bandwidth "
            f"in that run {r['copy_tbps']:.2f} TB/s; timing: {r.get('timing', 'host')})"
            for (n, k), r in zip(shapes, runs)]


def write_report(env: dict, bw: float, results: list[Result], shapes, ms, out_dir: Path, argv: str,
                 smoke: bool = False, runs_by_shape: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    card = env["card"]
    md = out_dir / f"{card}.md"
    lines = [f"# jaxfp4 GEMM benchmark: {env['device_kind']}", "",
             *([SMOKE_NOTE] if smoke else []),
             f"- card: {env['device_kind']} ({env['nvidia_smi']})",
             f"- driver CUDA version: {env['driver_cuda']}; XLA platform: {env['platform_version']}",
             f"- jax {env['jax']}, jaxlib {env['jaxlib']}, python {env['python']}",
             f"- device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (bytes read + written, 2 GiB); "
             f"L2 taken as {env['l2_mb']} MB",
             *command_lines(env, bw, argv, shapes, runs_by_shape),
             "- timing: R python-unrolled calls in one jit (R = 48 for M <= 32, 24 to M = 256, 8 to 1024, "
             "else 4), each call with its own activation and its own weight copy (R copies: far over 2x L2; "
             "no DotMerger/CSE sharing); per-call time, median of the runs: `clock` (t1 - t0) / R with t0, t1 "
             "the GPU's %globaltimer read by jaxfp4_bench_clock before the first and after the last call of "
             "an execution, or `host` (T(E2 executions) - T(E1)) / ((E2 - E1) R), host-synchronised once per "
             "batch of executions",
             "- `floor x`: time / read-floor time (the same NVFP4 weight bytes streamed by "
             "jaxfp4_bench_stream_read, each call loading once the previous call's kernel has finished, as "
             "the GEMM kernels do), M <= 32 only; `vs bf16` and `vs best other`: speed-up "
             "(other time / this time) over xla_bf16 and over the fastest non-jaxfp4 method of the row",
             "- jax_scaled_matmul gets pre-quantized activations (its quantization is NOT timed); "
             "jaxfp4 W4A4 quantizes activations (static g_a) inside the timed region",
             "- `_packed`: weights from jaxfp4.prepare_weights (what users and examples/decode.py run); "
             "the other jaxfp4 rows read weights in checkpoint order", ""]
    by = {(r.shape, r.m, r.method): r for r in results}
    for n, k in shapes:
        floor = next((r for r in results if r.shape == (n, k) and r.method == "read_floor" and r.us), None)
        lines += [f"## N={n}, K={k} (NVFP4 weight {fmt.nvfp4_bytes(n, k) / 1e6:.1f} MB"
                  + (f"; read floor {floor.us:.1f} us = {floor.extra['GB/s']:.0f} GB/s)" if floor else ")"), "",
                  "| M | method | us | TFLOP/s | floor x | vs bf16 | vs best other | path / note |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        for m in ms:
            base = [by.get(((n, k), m, b)) for b in BASELINES]
            best_other = min((b.us for b in base if b and b.us), default=None)
            bf16 = by.get(((n, k), m, "xla_bf16"))
            for method in METHODS:
                r = by.get(((n, k), m, method))
                if r is None:
                    continue
                if r.us is None:
                    lines.append(f"| {m} | {method} | - | - | - | - | - | {r.note} |")
                    continue
                fl = f"{r.us / floor.us:.2f}" if floor and m <= 32 else ""
                if fl and below_floor(r.us, floor.us):
                    r = replace(r, note=(r.note + " " if r.note else "") + BELOW_FLOOR_NOTE)
                vb = f"{bf16.us / r.us:.2f}" if bf16 and bf16.us else ""
                vo = f"{best_other / r.us:.2f}" if best_other and method in JAXFP4 else ""
                lines.append(f"| {m} | {method} | {r.us:.1f} | {tflops(m, n, k, r.us):.1f} | {fl} | {vb} | {vo} "
                             f"| {r.path or ''}{(' ' + r.note) if r.note else ''} |")
        lines.append("")
    md.write_text("\n".join(lines))
    try:
        plot(results, shapes, ms, out_dir / f"{card}.png", env)
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}")
    return md


def save_results(path: Path, env: dict, results: list[Result], runs_by_shape: dict) -> None:
    """The raw results beside the report, so that a later run can --merge into it."""
    path.write_text(json.dumps({"env": env, "runs_by_shape": runs_by_shape,
                                "results": [asdict(r) for r in results]}, indent=1))


def load_results(path: Path, env: dict, keep) -> tuple[list[Result], dict]:
    """Results (and their runs) of an earlier run on the same card whose shape
    `keep(shape)` accepts; nothing when there is no such file or the card differs."""
    if not path.exists():
        return [], {}
    data = json.loads(path.read_text())
    if data["env"].get("device_kind") != env["device_kind"]:
        print(f"# --merge: {path} is from {data['env'].get('device_kind')}, not merged", flush=True)
        return [], {}
    old = [Result(tuple(r["shape"]), r["m"], r["method"], r["us"], r["path"], r["note"], r["extra"])
           for r in data["results"]]
    old = [r for r in old if keep(r.shape)]
    runs = {key: v for key, v in data["runs_by_shape"].items() if keep(tuple(map(int, key.split("x"))))}
    return old, runs


def plot_style(method: str) -> dict:
    """Line style of a method: baselines thin with squares; a jaxfp4 path one color
    per kernel, solid on prepared weights, dotted on checkpoint-order weights."""
    if method == "read_floor":
        return dict(ls="--", color="k", lw=1)
    if method in BASELINES:
        return dict(marker="s", ms=3, lw=1, alpha=0.8, color=f"C{BASELINES.index(method)}")
    color = "C4" if "w4a16" in method else "C6" if w4a4_layout(method) == "8x4" else "C9"
    return dict(marker="o", ms=3, color=color, **(dict(lw=1.8) if is_packed(method) else dict(ls=":")))


def plot(results, shapes, ms, path: Path, env) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(2, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    for ax, (n, k) in zip(axes.flat, shapes):
        for method in METHODS + ("read_floor",):
            pts = [(r.m, tflops(r.m, n, k, r.us)) for r in results
                   if r.shape == (n, k) and r.method == method and r.us and r.m in ms
                   and (method != "read_floor" or r.m <= 32)]
            if not pts:
                continue
            pts.sort()
            label = "read floor, M <= 32 (weight bytes streamed)" if method == "read_floor" else method
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **plot_style(method))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"N={n}, K={k}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    fig.suptitle(f"jaxfp4 GEMM, {env['device_kind']}, jax {env['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- main -----------------------------------------------------------------------------

def parse_shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.lower().split("x")) for part in s.split(",") if part]


def parse_methods(ap: argparse.ArgumentParser, spec: str | None, known: tuple[str, ...]) -> list[str]:
    """The methods of a comma-separated --methods value (all of `known` when None);
    an unknown name is a usage error that lists the known ones."""
    if not spec:
        return list(known)
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        ap.error(f"--methods: unknown {unknown or spec!r}; choose from {','.join(known)}")
    return methods


def out_dir(out: str | None, smoke: bool) -> Path:
    """--out, else benchmarks/results (a fresh temporary folder for a smoke run)."""
    if out:
        return Path(out)
    return Path(tempfile.mkdtemp(prefix="jaxfp4_bench_smoke_")) if smoke else RESULTS


def add_common_args(ap: argparse.ArgumentParser, methods: tuple[str, ...]) -> None:
    """The options gemm.py and quantize.py share."""
    ap.add_argument("--methods", help="comma-separated subset of: " + ",".join(methods))
    ap.add_argument("--runs", type=int, default=10, help="timed runs per point (median; >= 10)")
    ap.add_argument("--out", help="results folder (default benchmarks/results; with --smoke a temporary one)")
    ap.add_argument("--allow-fallback", action="store_true",
                    help="also time jaxfp4 paths that lower to the pure-JAX reference")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long check on tiny shapes (CPU allowed), not a measurement")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shapes (28672,4096),(8192,8192); M 1,8,16,32,128")
    ap.add_argument("--shapes", help="NxK list, e.g. 28672x4096,8192x8192")
    ap.add_argument("--ms", help="M list, e.g. 1,8,32")
    add_common_args(ap, METHODS + ("read_floor",))
    ap.add_argument("--merge", action="store_true",
                    help="keep the other shapes of an earlier run on the same card (<card>.json in the "
                         "results folder) in the report: for shapes measured in separate runs")
    ap.add_argument("--timing", choices=("auto", "clock", "host"), default="auto",
                    help="clock: the GPU's clock around each execution's R calls (jaxfp4_bench_clock); "
                         "host: host-timed executions; auto (default): clock where available")
    ap.add_argument("--chain", action="store_true",
                    help="every call's operands wait for the previous call's output (dependent calls, as "
                         "in a model), so no two calls of a row run concurrently")
    args = ap.parse_args(argv)
    if args.timing == "clock" and not clock_available():
        ap.error("--timing clock needs a GPU and a jaxfp4 build with CUDA kernels")
    TIMING["chain"] = args.chain
    TIMING["mode"] = "clock" if args.timing == "clock" or (args.timing == "auto" and clock_available()) else "host"
    smoke = args.smoke
    shapes = (parse_shapes(args.shapes) if args.shapes else SMOKE_SHAPES if smoke
              else QUICK_SHAPES if args.quick else FULL_SHAPES)
    ms = ([int(v) for v in args.ms.split(",")] if args.ms else SMOKE_MS if smoke
          else QUICK_MS if args.quick else FULL_MS)
    methods = parse_methods(ap, args.methods, METHODS + ("read_floor",))
    if smoke and not args.methods:
        methods.remove("read_floor")  # CUDA only, and thousands of buffers for a tiny weight
    runs = 2 if smoke else max(args.runs, 1)
    out = out_dir(args.out, smoke)

    env = environment()
    print(f"# {env['device_kind']} | driver {env['nvidia_smi']} | CUDA {env['driver_cuda']} | "
          f"jax {env['jax']} | {env['platform_version']}", flush=True)
    info = jaxfp4.backend_info()
    print(f"# jaxfp4 cuda_build={info['cuda_build']} targets={info['targets'].get('cuda', [])}", flush=True)
    bw = copy_bandwidth(8 << 20, runs=2) if smoke else copy_bandwidth()
    print(f"# device-to-device copy: {bw / 1e12:.2f} TB/s; timing: {TIMING['mode']}", flush=True)
    cmdline = " ".join(sys.argv[1:] if argv is None else argv)
    results, runs_by_shape, done = [], {}, []
    if args.merge:
        results, runs_by_shape = load_results(out / f"{env['card']}.json", env, lambda sh: sh not in shapes)
        done = list(dict.fromkeys(r.shape for r in results))  # in the order they were measured
        print(f"# --merge: kept {len(results)} results of shapes {done}", flush=True)
    calls = (lambda m: 2) if smoke else calls_for
    this_run = {"command": cmdline, "git": env["git"], "copy_tbps": round(bw / 1e12, 2), "timing": TIMING["mode"],
                "chain": TIMING["chain"]}
    for i, (n, k) in enumerate(shapes):
        print(f"## N={n} K={k}", flush=True)
        results += bench_shape(n, k, ms, methods, runs, args.allow_fallback, lambda s: print(s, flush=True),
                               calls=calls)
        runs_by_shape[f"{n}x{k}"] = this_run
        # Rewritten after every shape: a run cut short still leaves its finished shapes.
        report_ms = sorted({r.m for r in results} | set(ms))
        md = write_report(env, bw, results, done + shapes[:i + 1], report_ms, out, cmdline, smoke=smoke,
                          runs_by_shape=runs_by_shape)
        save_results(md.with_suffix(".json"), env, results, runs_by_shape)
    print(f"# wrote {md} and {md.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
