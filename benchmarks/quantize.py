"""Quantize benchmark of jaxfp4 (bf16 [M, K] -> NVFP4), following the shared
benchmark-protocol.md and timed exactly like benchmarks/gemm.py (whose helpers
it imports): R python-unrolled calls inside one jitted function, each call on
its own input copy (no CSE, no reuse), (T(E2 executions) - T(E1)) / ((E2 - E1) R)
so that host dispatch and synchronisation cancel out, median of >= 10 runs
after two warm-up runs. Each call's input also passes through an optimization
barrier with the previous call's output (free at run time), so XLA cannot fuse
the R independent calls of the elementwise baseline into one kernel.

R = max(R_gemm(M), copies whose input + output bytes total > 128 MiB), at most
64: from M = 128 on (K = 8192) the inputs rotated through exceed 2x the L2
cache; for smaller M they stay L2-resident, as an activation fresh from the
previous layer does.

Methods (x: bfloat16 [M, K], normal random data):
  xla_convert_fp8          x.astype(float8_e4m3fn) in the jit: XLA's own streaming
                           conversion (2 bytes read, 1 written per element)
  jaxfp4_static_<layout>   jaxfp4.quantize(x, g, sf_layout=layout), g given (a static
                           activation scale): one kernel launch (sm90_quantize)
  jaxfp4_dynamic_<layout>  jaxfp4.quantize(x, None, sf_layout=layout): g from the amax,
                           an amax kernel then the quantize kernel (sm90_quantize_dynamic)
  layouts: 8x4 (the small-batch layout; timed for M <= 128 only), 128x4, linear

Goals (the issue's): quantize of a [M <= 32, 8192] activation in <= 5 us on the
device (one launch); of an [8192, 8192] tensor at >= 80% of the card's
device-to-device copy bandwidth (gemm.copy_bandwidth, bytes read + written),
bandwidth here being (input bytes + output bytes: codes, padded scales, g) / time.

Usage: python benchmarks/quantize.py [--shapes 1x8192,8192x8192] [--methods ...] [--runs 10]
Writes benchmarks/results/<card>_quantize.md and <card>_quantize.png.
--smoke: a few seconds on tiny shapes (CPU allowed, results to a temporary folder
unless --out): checks that the script runs, measures nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gemm  # noqa: E402  (also puts the repo root on sys.path and registers jaxfp4's targets)
from gemm import Result  # noqa: E402

import jaxfp4  # noqa: E402

K = 8192
FULL_SHAPES = [(m, K) for m in (1, 8, 32, 128, 1024, 8192)]
SMOKE_SHAPES = [(1, 256), (32, 256), (256, 512)]
LAYOUTS = ("8x4", "128x4", "linear")
SMALL_LAYOUT_MAX_M = 128     # 8x4 is meant for small M: timed up to here
BASELINE = "xla_convert_fp8"
JAXFP4 = tuple(f"jaxfp4_{kind}_{layout}" for kind in ("static", "dynamic") for layout in LAYOUTS)
METHODS = (BASELINE,) + JAXFP4
MAX_CALLS = 64
DEVICE_TIME_MAX_M = 32  # rows up to this M (the small-M goal's) also get the device time from profiler traces

GOAL_SMALL_M, GOAL_SMALL_US = 32, 5.0             # [M <= 32, 8192] in <= 5 us
GOAL_LARGE_ELEMS, GOAL_LARGE_FRACTION = 8192 * 8192, 0.80   # [8192, 8192] at >= 80% of copy


def method_parts(method: str) -> tuple[bool, str]:
    """(dynamic, sf_layout) of a jaxfp4 method ("jaxfp4_dynamic_128x4" -> (True, "128x4"))."""
    _, kind, layout = method.split("_", 2)
    return kind == "dynamic", layout


def applies(method: str, m: int) -> bool:
    """Whether a method is timed at M = m (8x4 only for small M)."""
    return method == BASELINE or method_parts(method)[1] != "8x4" or m <= SMALL_LAYOUT_MAX_M


def n_calls(m: int, moved_bytes: int, smoke: bool = False) -> int:
    """R at M = m, each call moving `moved_bytes`: gemm's R, raised until the bytes rotated
    through exceed gemm.MIN_ROTATION_BYTES, at most MAX_CALLS (2 in a smoke run)."""
    if smoke:
        return 2
    return min(MAX_CALLS, max(gemm.calls_for(m), gemm.n_copies(moved_bytes)))


def small_m_us(r: Result) -> float | None:
    """The time the small-M goal is judged on: the device time ("<= 5 us on the
    device": a launch-bound kernel's own time) when measured, else the call time."""
    dev = r.extra.get("device_us")
    return dev if dev is not None else r.us


def goal(method: str, m: int, k: int, us: float | None, pct_copy: float | None) -> str:
    """The issue's goal that applies to this row and whether it is met ("" when none applies);
    `us` is small_m_us(row) for the small-M goal."""
    if method == BASELINE or us is None:
        return ""
    if m <= GOAL_SMALL_M and k == K:
        return f"<= {GOAL_SMALL_US:g} us on the device: {'yes' if us <= GOAL_SMALL_US else 'NO'}"
    if m * k >= GOAL_LARGE_ELEMS and pct_copy is not None:
        ok = pct_copy >= 100 * GOAL_LARGE_FRACTION
        return f">= {100 * GOAL_LARGE_FRACTION:.0f}% copy: {'yes' if ok else 'NO'}"
    return ""


def make_call(method: str):
    """call(x, g) of a method (g is ignored by dynamic quantize and the baseline)."""
    if method == BASELINE:
        return lambda x, g: x.astype(jnp.float8_e4m3fn)
    dynamic, layout = method_parts(method)
    if dynamic:
        return lambda x, g: jaxfp4.quantize(x, sf_layout=layout)
    return lambda x, g: jaxfp4.quantize(x, g, sf_layout=layout)


def nbytes(tree) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))


# ---- one shape -----------------------------------------------------------------------

def bench_shape(m: int, k: int, methods: list[str], runs: int, allow_fallback: bool, log,
                smoke: bool = False) -> list[Result]:
    results: list[Result] = []
    methods = [meth for meth in methods if applies(meth, m)]
    if not methods:
        return results
    platform = gemm.lowering_platform()
    in_bytes = m * k * 2
    # One input set for all methods, R sized by the method with the largest output.
    x_spec, g_spec = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.float32)
    out_max = max(nbytes(jax.eval_shape(make_call(meth), x_spec, g_spec)) for meth in methods)
    r = n_calls(m, in_bytes + out_max, smoke)
    keys = jax.random.split(jax.random.key(m * 131 + k), r)
    xs = [jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in keys]
    amax = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in xs)
    g = jnp.float32(amax / 2688.0)  # a static activation scale: amax / (6 * 448)
    log(f"  R = {r} calls, inputs {r * in_bytes / 1e6:.1f} MB in all")

    for method in methods:
        res = Result((m, k), m, method)
        try:
            call = make_call(method)
            out_bytes = nbytes(jax.eval_shape(call, xs[0], g))
            res.extra = {"bytes": in_bytes + out_bytes, "R": r}
            if method != BASELINE:
                # Lower once to learn the path; skip the pure-JAX fallback unless asked.
                jax.jit(call).lower(xs[0], g)
                lowered = jaxfp4.backend_info()["lowered"].get(f"quantize[{platform}]", "?")
                res.path = lowered
                if lowered == "reference" and not allow_fallback:
                    res.note = "skipped: no native kernel in this build (reference fallback)"
                    results.append(res)
                    log(f"  M={m:5d} {method:22s} skipped ({lowered})")
                    continue
            t = gemm.time_calls(call, xs, [g], runs, chain=True)
            res.us = t * 1e6
            if m <= DEVICE_TIME_MAX_M:  # launch-bound sizes: the kernels' own time too
                dt = gemm.device_time_calls(call, xs, [g], chain=True)
                res.extra["device_us"] = dt * 1e6 if dt is not None else None
            if method != BASELINE:
                ran = jaxfp4.backend_info()["kernels_run"].get("quantize")
                res.path = f"{res.path} -> {ran}" if ran else res.path
            dev = res.extra.get("device_us")
            log(f"  M={m:5d} {method:22s} {res.us:10.2f} us  {res.extra['bytes'] / t / 1e9:8.1f} GB/s"
                + (f"  device {dev:6.2f} us" if dev is not None else "") + f"  {res.path}")
        except Exception as e:  # noqa: BLE001
            res.note = gemm.error_note(e)
            log(f"  M={m:5d} {method:22s} FAILED {res.note}")
        results.append(res)
    del xs
    return results


# ---- report ----------------------------------------------------------------------------

def gbps(r: Result) -> float | None:
    return r.extra["bytes"] / (r.us * 1e-6) / 1e9 if r.us else None


def write_report(env: dict, bw: float, results: list[Result], shapes, out_dir: Path, argv: str,
                 smoke: bool = False) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{env['card']}_quantize.md"
    copy_gbps = bw / 1e9
    lines = [f"# jaxfp4 quantize benchmark: {env['device_kind']}", "",
             *([gemm.SMOKE_NOTE] if smoke else []),
             f"- card: {env['device_kind']} ({env['nvidia_smi']})",
             f"- driver CUDA version: {env['driver_cuda']}; XLA platform: {env['platform_version']}",
             f"- jax {env['jax']}, jaxlib {env['jaxlib']}, python {env['python']}",
             f"- device-to-device copy bandwidth: {bw / 1e12:.2f} TB/s (bytes read + written); "
             f"L2 taken as {env['l2_mb']} MB",
             f"- command: `python benchmarks/quantize.py {argv}` (git {env['git']})",
             "- timing: R python-unrolled calls in one jit, each on its own bf16 input (R = the GEMM "
             "benchmark's R, raised until the inputs + outputs rotated through exceed 128 MiB, at most "
             f"{MAX_CALLS}: column R), call i's input chained to call i-1's output by an optimization barrier "
             "(no horizontal fusion of the baseline), host-synchronised once per batch of executions; "
             "per-call time = (T(E2 executions) - T(E1)) / ((E2 - E1) R), median of the runs; "
             f"`device us` (M <= {DEVICE_TIME_MAX_M}): the GPU's busy time per call (kernel durations "
             "summed over a profiler trace of one execution, / R; median of 3 traces): what a launch-bound "
             "kernel costs on the device, without the host's per-call dispatch, which the call time "
             "includes when the kernels are shorter than it",
             "- `GB/s`: (input bytes + output bytes) / time, outputs being codes + padded scales (+ g); "
             "`% copy`: that over the copy bandwidth; `vs convert`: xla_convert_fp8 time / this time",
             f"- goals: [M <= {GOAL_SMALL_M}, {K}] in <= {GOAL_SMALL_US:g} us (one launch: the static "
             f"rows; dynamic = amax kernel + quantize kernel); [8192, 8192] at >= "
             f"{100 * GOAL_LARGE_FRACTION:.0f}% of copy bandwidth",
             "- path: the FFI target the lowering chose -> the kernel that last ran "
             "(jaxfp4.backend_info()['kernels_run'])", ""]
    lines += goal_summary(results, copy_gbps)
    by = {(r.shape, r.method): r for r in results}
    for k in sorted({k for _, k in shapes}):
        lines += [f"## K={k}", "",
                  "| M | method | us | device us | MB moved | GB/s | % copy | vs convert | goal | R | path / note |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
        for m in sorted(m for m, kk in shapes if kk == k):
            base = by.get(((m, k), BASELINE))
            for method in METHODS:
                r = by.get(((m, k), method))
                if r is None:
                    continue
                if r.us is None:
                    lines.append(f"| {m} | {method} | - | - | - | - | - | - | - | - | {r.note} |")
                    continue
                rate = gbps(r)
                pct = 100 * rate / copy_gbps if copy_gbps else None
                vs = f"{base.us / r.us:.2f}" if base and base.us and method != BASELINE else ""
                dev = r.extra.get("device_us")
                judged = small_m_us(r) if m <= GOAL_SMALL_M else r.us
                lines.append(f"| {m} | {method} | {r.us:.2f} | {'' if dev is None else f'{dev:.2f}'} "
                             f"| {r.extra['bytes'] / 1e6:.2f} | {rate:.0f} "
                             f"| {pct:.1f} | {vs} | {goal(method, m, k, judged, pct)} | {r.extra['R']} "
                             f"| {r.path}{(' ' + r.note) if r.note else ''} |")
        lines.append("")
    md.write_text("\n".join(lines))
    try:
        plot(results, shapes, bw, md.with_suffix(".png"), env)
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}")
    return md


def goal_summary(results: list[Result], copy_gbps: float) -> list[str]:
    """Markdown lines: per jaxfp4 method, the slowest [M <= 32, K] time and the
    [8192, 8192] bandwidth against the goals (no lines when no row applies)."""
    rows = []
    for method in JAXFP4:
        small = [r for r in results if r.method == method and r.us and r.m <= GOAL_SMALL_M and r.shape[1] == K]
        large = [r for r in results if r.method == method and r.us and r.m * r.shape[1] >= GOAL_LARGE_ELEMS]
        if not small and not large:
            continue
        worst = max(small, key=small_m_us) if small else None
        pct = 100 * gbps(large[0]) / copy_gbps if large and copy_gbps else None
        rows.append(f"| {method} "
                    + (f"| {small_m_us(worst):.2f} (M={worst.m}) | {'yes' if small_m_us(worst) <= GOAL_SMALL_US else 'NO'} "
                       if worst else "| - | - ")
                    + (f"| {pct:.1f} | {'yes' if pct >= 100 * GOAL_LARGE_FRACTION else 'NO'} |"
                       if pct is not None else "| - | - |"))
    if not rows:
        return []
    return ["## Goals", "",
            f"| method | slowest device us, M <= {GOAL_SMALL_M} (K={K}) | <= {GOAL_SMALL_US:g} us "
            f"| % copy at [8192, 8192] | >= {100 * GOAL_LARGE_FRACTION:.0f}% |",
            "|---|---:|---|---:|---|", *rows, ""]


def plot_style(method: str) -> dict:
    """The baseline black with squares; jaxfp4 static solid, dynamic dotted."""
    if method == BASELINE:
        return dict(marker="s", color="k", lw=1)
    return dict(marker="o", ms=3, ls=":" if method_parts(method)[0] else "-")


def plot(results, shapes, bw, path: Path, env) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted({k for _, k in shapes})
    fig, axes = plt.subplots(len(ks), 2, figsize=(14, 5 * len(ks)), squeeze=False)
    for (ax_us, ax_bw), k in zip(axes, ks):
        for method in METHODS:
            pts = sorted((r.shape[0], r.us, gbps(r)) for r in results
                         if r.shape[1] == k and r.method == method and r.us)
            if not pts:
                continue
            style = plot_style(method)
            ax_us.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
            ax_bw.plot([p[0] for p in pts], [p[2] for p in pts], label=method, **style)
        ax_us.axhline(GOAL_SMALL_US, color="r", lw=0.8, ls="--", label=f"goal {GOAL_SMALL_US:g} us (M <= 32)")
        ax_bw.axhline(bw / 1e9, color="k", lw=0.8, ls="--", label="copy bandwidth")
        ax_bw.axhline(GOAL_LARGE_FRACTION * bw / 1e9, color="r", lw=0.8, ls="--",
                      label=f"goal {100 * GOAL_LARGE_FRACTION:.0f}% of copy")
        for ax, ylabel in ((ax_us, "us per call"), (ax_bw, "GB/s (input + output bytes)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (rows)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"bf16 [M, {k}] -> NVFP4")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"jaxfp4 quantize, {env['device_kind']}, jax {env['jax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- main -----------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="MxK list, e.g. 1x8192,32x8192,8192x8192 "
                                     "(default M in 1,8,32,128,1024,8192 with K=8192)")
    gemm.add_common_args(ap, METHODS)
    args = ap.parse_args(argv)
    smoke = args.smoke
    shapes = gemm.parse_shapes(args.shapes) if args.shapes else SMOKE_SHAPES if smoke else FULL_SHAPES
    methods = gemm.parse_methods(ap, args.methods, METHODS)
    runs = 2 if smoke else max(args.runs, 1)
    out = gemm.out_dir(args.out, smoke)

    env = gemm.environment()
    print(f"# {env['device_kind']} | driver {env['nvidia_smi']} | CUDA {env['driver_cuda']} | "
          f"jax {env['jax']} | {env['platform_version']}", flush=True)
    info = jaxfp4.backend_info()
    print(f"# jaxfp4 cuda_build={info['cuda_build']} targets={info['targets'].get('cuda', [])}", flush=True)
    bw = gemm.copy_bandwidth(8 << 20, runs=2) if smoke else gemm.copy_bandwidth()
    print(f"# device-to-device copy: {bw / 1e12:.2f} TB/s", flush=True)
    results: list[Result] = []
    cmdline = " ".join(sys.argv[1:] if argv is None else argv)
    for i, (m, k) in enumerate(shapes):
        print(f"## M={m} K={k}", flush=True)
        results += bench_shape(m, k, methods, runs, args.allow_fallback, lambda s: print(s, flush=True), smoke)
        # Rewritten after every shape: a run cut short still leaves its finished shapes.
        md = write_report(env, bw, results, shapes[:i + 1], out, cmdline, smoke=smoke)
    print(f"# wrote {md} and {md.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
