"""jaxfp4 in one page: quantize a weight to NVFP4, run the weight-only (W4A16)
and the 4-bit x 4-bit (W4A4) GEMM, and compare with a bfloat16 matmul.

Runs on the GPU when there is one, else on the CPU."""

import jax
import jax.numpy as jnp

import jaxfp4


def rel_err(x, ref):
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def main(m: int = 8, n: int = 4096, k: int = 4096) -> None:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)                 # activations (tokens x K)
    w = (jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)  # a Linear's weight [N, K]

    w_q = jaxfp4.quantize(w)                  # NVFP4 weights: 0.5625 bytes per element
    w_q = jaxfp4.prepare_weights(w_q)         # offline repack for the GPU kernel (exact)

    ref = jnp.dot(x, w.T, preferred_element_type=jnp.float32)       # the bf16 model
    w4a16 = jax.jit(lambda a, b: jaxfp4.matmul(a, b))(x, w_q)
    w4a4 = jax.jit(lambda a, b: jaxfp4.matmul(jaxfp4.quantize(a, sf_layout="8x4"), b))(x, w_q)
    w_hat = jaxfp4.dequantize(jaxfp4.unprepare_weights(w_q), jnp.bfloat16)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"weight [{n}, {k}]: bf16 {w.nbytes / 2**20:.1f} MiB -> NVFP4 {w_q.nbytes / 2**20:.1f} MiB")
    print(f"weight quantization error (relative L2):       {rel_err(w_hat, w):.4f}")
    print(f"W4A16 matmul vs bf16 matmul (relative L2):     {rel_err(w4a16, ref):.4f}")
    print(f"W4A4  matmul vs bf16 matmul (relative L2):     {rel_err(w4a4, ref):.4f}")
    info = jaxfp4.backend_info()
    print("lowered:", ", ".join(f"{op} -> {path}" for op, path in sorted(info["lowered"].items())))
    print("native kernels run:", info["kernels_run"] or "none")


if __name__ == "__main__":
    main()
