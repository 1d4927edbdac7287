"""The benchmark scripts run end to end (`--smoke`: tiny shapes, CPU allowed)
and their pure-Python parts (method names, R, goals) do what their docstrings
say. No speed is measured here."""

import importlib
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gemm():
    sys.path.insert(0, str(BENCH))  # benchmarks/ is not a package; quantize.py imports gemm
    return importlib.import_module("gemm")


@pytest.fixture(scope="module")
def qbench(gemm):
    return importlib.import_module("quantize")


def _rows(md: Path) -> list[list[str]]:
    """The table rows (cells) of a report, header and separator rows left out."""
    rows = []
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append(cells)
    return rows


# ---- gemm.py ---------------------------------------------------------------------------

def test_gemm_method_names(gemm):
    assert {"jaxfp4_w4a4_8x4_packed", "jaxfp4_w4a4_128x4_packed"} <= set(gemm.METHODS)
    assert {m for m in gemm.METHODS if gemm.is_packed(m)} == {
        "jaxfp4_w4a16_packed", "jaxfp4_w4a4_8x4_packed", "jaxfp4_w4a4_128x4_packed",
        "jaxfp4_w4a4_input_scale_packed"}
    assert gemm.w4a4_layout("jaxfp4_w4a4_8x4") == "8x4"
    assert gemm.w4a4_layout("jaxfp4_w4a4_8x4_packed") == "8x4"
    assert gemm.w4a4_layout("jaxfp4_w4a4_128x4_packed") == "128x4"
    assert gemm.w4a4_layout("jaxfp4_w4a16_packed") is None
    assert gemm.w4a4_layout("jaxfp4_w4a4_input_scale_packed") == "8x4"


def test_gemm_smoke_reports_every_method(gemm, tmp_path):
    assert gemm.main(["--smoke", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("*.md")
    assert md.with_suffix(".png").exists()
    assert "SMOKE RUN" in md.read_text()
    rows = _rows(md)
    for m in gemm.SMOKE_MS:
        timed = {r[1] for r in rows if int(r[0]) == m and r[2] != "-"}
        assert timed == set(gemm.METHODS), (m, [r for r in rows if r[2] == "-"])


def test_gemm_methods_option_takes_the_packed_w4a4(gemm, tmp_path):
    new = ["jaxfp4_w4a4_8x4_packed", "jaxfp4_w4a4_128x4_packed"]
    assert gemm.main(["--smoke", "--ms", "1", "--methods", ",".join(new), "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("*.md")
    rows = _rows(md)
    assert [r[1] for r in rows] == new and all(r[2] != "-" for r in rows)
    assert all("jaxfp4_gemm_w4a4" in r[-1] for r in rows)


def test_gemm_merge_keeps_the_other_shapes(gemm, tmp_path):
    """--merge: a second run's shape joins the first run's in one report, each
    shape naming the command that measured it; a re-measured shape is replaced."""
    first = ["--smoke", "--ms", "1", "--methods", "xla_bf16,jaxfp4_w4a16", "--out", str(tmp_path)]
    assert gemm.main(first) == 0
    assert gemm.main(first[:-2] + ["--shapes", "64x512", "--merge", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("*.md")
    text = md.read_text()
    assert "## N=128, K=256" in text and "## N=64, K=512" in text
    assert "- N=128, K=256: `python benchmarks/gemm.py --smoke" in text and "--shapes 64x512 --merge" in text
    assert len(_rows(md)) == 4  # 2 methods x 2 shapes, none twice
    assert gemm.main(first[:-2] + ["--shapes", "64x512", "--merge", "--out", str(tmp_path)]) == 0
    assert len(_rows(md)) == 4


def test_gemm_flags_times_under_the_read_floor(gemm, tmp_path):
    """A time under the read floor of the same weight is the timing's noise: the
    report says so on that row (and only there)."""
    assert gemm.below_floor(8.7, 11.6) and not gemm.below_floor(11.2, 11.6)
    assert not gemm.below_floor(8.7, None) and not gemm.below_floor(None, 11.6)
    env = {"card": "test", "device_kind": "Test GPU", "nvidia_smi": "-", "driver_cuda": "-",
           "platform_version": "-", "jax": "-", "jaxlib": "-", "python": "-", "l2_mb": "50", "git": "-"}
    R = gemm.Result
    results = [R((4096, 14336), m, "read_floor", 11.6, extra={"GB/s": 2850.0}) for m in (16, 32)]
    results += [R((4096, 14336), 16, "jaxfp4_w4a16_packed", 16.4), R((4096, 14336), 32, "jaxfp4_w4a16_packed", 8.7)]
    md = gemm.write_report(env, 2.4e12, results, [(4096, 14336)], [16, 32], tmp_path, "--test")
    rows = {int(r[0]): r for r in _rows(md) if r[1] == "jaxfp4_w4a16_packed"}
    assert gemm.BELOW_FLOOR_NOTE in rows[32][-1] and gemm.BELOW_FLOOR_NOTE not in rows[16][-1]


def test_gemm_rejects_unknown_methods(gemm, capsys):
    with pytest.raises(SystemExit):
        gemm.main(["--smoke", "--methods", "jaxfp4_w4a4_8x4_prepared"])
    assert "jaxfp4_w4a4_8x4_packed" in capsys.readouterr().err  # lists the known names


def _eqns(closed):
    """The equations of a jitted function's body (inside its pjit)."""
    (outer,) = closed.jaxpr.eqns
    return outer.params["jaxpr"].jaxpr.eqns


def test_gemm_clock_brackets_every_call(gemm):
    """--timing clock: the first clock reads before every call (each call's
    operands pass a barrier with its output) and the last one after all of them
    (every output is its operand), so t1 - t0 spans the R calls and no more."""
    r = 3
    acts = [jnp.full((2, 4), i, jnp.float32) for i in range(r)]
    weights = [jnp.ones((4, 5), jnp.float32)]
    many = gemm.unrolled(lambda a, w: a @ w, r, 1, clock=True)
    eqns = _eqns(jax.make_jaxpr(many)(acts, weights))
    clocks = [i for i, e in enumerate(eqns) if e.primitive.name == "ffi_call"]
    assert len(clocks) == 2 and all(eqns[i].params["target_name"] == "jaxfp4_bench_clock" for i in clocks)
    t0 = eqns[clocks[0]].outvars[0]
    barriers = [e for e in eqns if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == r and all(t0 in e.invars for e in barriers)
    dots = [i for i, e in enumerate(eqns) if e.primitive.name == "dot_general"]
    assert len(dots) == r and clocks[0] < min(dots) and max(dots) < clocks[1]
    assert set(eqns[clocks[1]].invars) == {eqns[i].outvars[0] for i in dots}


def test_gemm_clock_timing_needs_a_gpu(gemm, capsys, tmp_path):
    if gemm.clock_available():
        pytest.skip("a GPU with the clock target: --timing clock is valid here")
    with pytest.raises(SystemExit):
        gemm.main(["--smoke", "--timing", "clock", "--out", str(tmp_path)])
    assert "--timing clock needs a GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_gemm_clock_times_device_work(gemm):
    """The GPU clock moves forward across the calls, by a plausible amount."""
    r = 4
    acts = [jnp.full((256, 2048), 0.5 + i, jnp.bfloat16) for i in range(r)]
    weights = [jnp.ones((2048, 2048), jnp.bfloat16) for _ in range(r)]
    t = gemm.clock_calls(lambda a, w: a @ w, acts, weights, runs=3)
    assert 0.0 < t < 0.1


# ---- quantize.py -----------------------------------------------------------------------

def test_quantize_method_names(qbench):
    assert len(qbench.JAXFP4) == 6 and qbench.METHODS[0] == "xla_convert_fp8"
    assert qbench.method_parts("jaxfp4_dynamic_128x4") == (True, "128x4")
    assert qbench.method_parts("jaxfp4_static_linear") == (False, "linear")
    assert qbench.applies("jaxfp4_static_8x4", 128) and not qbench.applies("jaxfp4_static_8x4", 1024)
    assert qbench.applies("jaxfp4_dynamic_128x4", 8192) and qbench.applies("xla_convert_fp8", 8192)


def test_quantize_calls_rotate_past_l2(qbench, gemm):
    """R >= the GEMM benchmark's R, <= MAX_CALLS, and over 2x a 60 MB L2 from M = 128 (K = 8192)."""
    for m, k in qbench.FULL_SHAPES:
        spec = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        out = qbench.nbytes(jax.eval_shape(qbench.make_call("jaxfp4_dynamic_128x4"), spec, None))
        moved = m * k * 2 + out
        r = qbench.n_calls(m, moved)
        assert gemm.calls_for(m) <= r <= qbench.MAX_CALLS
        if m >= 128:
            assert r * moved > 2 * 60e6, (m, r, moved)
    assert qbench.n_calls(8192, 1 << 30, smoke=True) == 2


def test_quantize_goals(qbench):
    assert qbench.goal("jaxfp4_static_8x4", 32, 8192, 4.9, 1.0) == "<= 5 us on the device: yes"
    assert qbench.goal("jaxfp4_static_8x4", 1, 8192, 5.1, 1.0) == "<= 5 us on the device: NO"
    assert qbench.goal("jaxfp4_static_128x4", 8192, 8192, 50.0, 85.0) == ">= 80% copy: yes"
    assert qbench.goal("jaxfp4_dynamic_128x4", 8192, 8192, 50.0, 79.9) == ">= 80% copy: NO"
    assert qbench.goal("jaxfp4_static_128x4", 1024, 8192, 20.0, 50.0) == ""
    assert qbench.goal("xla_convert_fp8", 1, 8192, 2.0, 10.0) == ""
    # the small-M goal is judged on the device time when the row has one
    row = qbench.Result((1, 8192), 1, "jaxfp4_static_8x4", us=9.0, extra={"device_us": 3.9})
    assert qbench.small_m_us(row) == 3.9
    assert qbench.small_m_us(qbench.Result((1, 8192), 1, "jaxfp4_static_8x4", us=9.0)) == 9.0


def test_quantize_smoke_reports_every_method(qbench, tmp_path):
    assert qbench.main(["--smoke", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("*_quantize.md")
    assert md.with_suffix(".png").exists()
    rows = _rows(md)
    for m, _ in qbench.SMOKE_SHAPES:
        timed = {r[1] for r in rows if int(r[0]) == m and r[2] != "-"}
        assert timed == {meth for meth in qbench.METHODS if qbench.applies(meth, m)}, m
    for r in rows:
        us, moved, rate = float(r[2]), float(r[4]), float(r[5])
        assert us > 0 and moved >= 0 and math.isfinite(rate)
        assert r[3] == ""  # no device time on the CPU
        if r[1].startswith("jaxfp4_dynamic"):
            assert r[-1].startswith("jaxfp4_quantize_dynamic -> ")
        elif r[1].startswith("jaxfp4_static"):
            assert r[-1].startswith("jaxfp4_quantize -> ")


# ---- decode_profile.py -----------------------------------------------------------------

def test_decode_profile_smoke(capsys):
    sys.path.insert(0, str(BENCH))
    prof = importlib.import_module("decode_profile")
    prof.main(["--config", "tiny", "--tokens", "2", "--prompt-len", "2", "--models", "bf16,w4a16", "--top", "3"])
    out = capsys.readouterr().out
    assert "## bf16, batch 1: wall" in out and "## w4a16, batch 1: wall" in out
    assert "kernels/token" in out  # the GPU columns are there (zero on the CPU)


def test_decode_profile_gemm_roles():
    """The GEMM launches of a token, in start order whatever kernel each ran, by projection."""
    sys.path.insert(0, str(BENCH))
    prof = importlib.import_module("decode_profile")
    layers, tokens = 2, 3
    events, t = [], 0
    for _ in range(tokens):
        for _ in range(layers):
            for us, name in ((1.0, "quantize_a"), (2.0, "quantize_a"), (3.0, "quantize_a"), (4.0, "quantize_a")):
                events.append((t, f"void jaxfp4::sm90_gemm::gemm_packed_kernel<{name}>", us))
                events.append((t + 1, "loop_add_fusion", 0.5))
                t += 2
        events.append((t, "void jaxfp4::sm90_gemm::gemm_packed_kernel<w4a16>", 9.0))
        t += 1
    roles = dict(prof.gemm_roles(sorted(events), tokens, layers))
    assert roles == {"qkv_proj": 1.0, "o_proj": 2.0, "gate_up_proj": 3.0, "down_proj": 4.0, "lm_head": 9.0}
    assert prof.gemm_roles(events[:-1], tokens, layers) == []  # a launch missing: no attribution


def test_pdl_capture_says_what_it_needs():
    """benchmarks/pdl_capture.py needs a CUDA GPU: without one it exits with that
    sentence (with one it is run by hand; NOTES session 12 has a run)."""
    import os
    import subprocess

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is here: the script would time, not refuse")
    proc = subprocess.run([sys.executable, str(BENCH / "pdl_capture.py")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr + proc.stdout
