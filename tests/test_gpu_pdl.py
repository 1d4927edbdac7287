"""Programmatic dependent launch (csrc/cuda/device.cuh): the packed GEMM and the
quantize kernel may start while the kernel before them finishes, and must not
read its results (or overwrite what it reads) before `griddepcontrol.wait`.

Under XLA's default command buffers the launch attribute has no effect, so
each case runs in a child process with command buffers off, where XLA
launches the kernels on the stream and they do overlap: a chain of dependent
jaxfp4 ops (each reading the previous one's output; weights quantized and
packed in the same jit, so a GEMM's weights are also a recent kernel's
output), run many times in a `fori_loop`, once with JAXFP4_PDL=1 and once
with JAXFP4_PDL=0 (ordinary launches, which the other GPU tests check against
the reference). The two must agree bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import jaxfp4

    seed, m, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rng = np.random.default_rng(seed)
    K = N = 2064  # not a power of two; K % 64 != 0 (a ragged last chunk)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    w = [jnp.asarray(rng.standard_normal((N, K)) * 0.015, jnp.bfloat16) for _ in range(3)]
    norm_w = jnp.asarray(1 + 0.1 * rng.standard_normal(K), jnp.bfloat16)
    g_w, g_a = jnp.float32(448 * 6 / 0.25), jnp.float32(448 * 6 / 4.0)

    @jax.jit
    def run(x, w0, w1, w2, norm_w):
        ws = [jaxfp4.prepare_weights(jaxfp4.quantize(wi, g_w)) for wi in (w0, w1, w2)]

        def step(_, y):
            h = jaxfp4.matmul(y, ws[0], prologue=jaxfp4.RMSNorm(norm_w, 1e-5), residual=y)
            h = jaxfp4.matmul(h, ws[1], input_scale=g_a, residual=h)  # W4A4 (in-kernel or 2 ops)
            q = jaxfp4.quantize(h, g_a, sf_layout="8x4")
            h = jaxfp4.matmul(q, ws[2], residual=h)
            h = h.astype(jnp.float32)
            return (h * jax.lax.rsqrt(jnp.mean(h * h))).astype(jnp.bfloat16)  # rms 1 into the next step

        return jax.lax.fori_loop(0, 24, step, x)

    out = np.asarray(run(x, *w, norm_w)).view(np.uint16)
    info = jaxfp4.backend_info()
    np.savez(out_path, out=out, pdl=info["pdl"], kernel=info["kernels_run"].get("gemm", ""))
""")


def _child(tmp_path: Path, seed: int, m: int, pdl: str) -> dict:
    out = tmp_path / f"pdl{pdl}_m{m}.npz"
    env = dict(os.environ)
    env.update(JAXFP4_PDL=pdl, XLA_FLAGS="--xla_gpu_enable_command_buffer=", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(seed), str(m), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16])
def test_dependent_launch_chain_matches_ordinary_launches(tmp_path, rng, m):
    seed = int(rng.integers(0, 2**31))
    on = _child(tmp_path, seed, m, "1")
    off = _child(tmp_path, seed, m, "0")
    assert bool(on["pdl"]) and not bool(off["pdl"])
    assert "sm90_gemm_small_m" in str(on["kernel"])
    values = (on["out"].astype(np.uint32) << 16).view(np.float32)
    assert np.isfinite(values).all() and np.abs(values).max() > 0  # a live chain, not NaNs or zeros
    np.testing.assert_array_equal(on["out"], off["out"])
