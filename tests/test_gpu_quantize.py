"""The CUDA quantize kernels (csrc/cuda/sm90/quantize.cu) against the pure-JAX
reference run on the CPU device: bit for bit, every layout, input dtype,
static and dynamic g, leading batch axes, ragged shapes and edge-case blocks
(nvfp4-spec.md section 2). Every test needs a CUDA GPU and a CUDA build of
jaxfp4 (tests/conftest.py skips them otherwise)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxfp4
import oracle
from jaxfp4 import format as fmt
from jaxfp4 import reference

pytestmark = pytest.mark.gpu

LAYOUTS = ("linear", "128x4", "8x4")
DTYPES = (np.float32, ml_dtypes.bfloat16, np.float16)
DTYPE_IDS = ("f32", "bf16", "f16")
K_VALUES = (16, 48, 272, 4096)


# ---- helpers -------------------------------------------------------------------

@functools.cache
def _gpu():
    return next(d for d in jax.devices() if d.platform == "gpu")


@functools.cache
def _cpu():
    return jax.devices("cpu")[0]


@functools.cache
def _gpu_fn(layout: str, dynamic: bool):
    if dynamic:
        return jax.jit(lambda x: jaxfp4.quantize(x, None, sf_layout=layout))
    return jax.jit(lambda x, g: jaxfp4.quantize(x, g, sf_layout=layout))


def _bits(a) -> np.ndarray:
    """The raw bytes/words of an array (float8 and float32 compared bitwise)."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a.view(np.uint32)
    if a.dtype.itemsize == 1:
        return a.view(np.uint8)
    return a


def run_gpu(x: np.ndarray, g: np.ndarray | None, layout: str):
    """jaxfp4.quantize on the GPU: (data, scales as uint8, g) numpy arrays."""
    xd = jax.device_put(x, _gpu())
    if g is None:
        t = _gpu_fn(layout, True)(xd)
    else:
        t = _gpu_fn(layout, False)(xd, jax.device_put(g, _gpu()))
    info = jaxfp4.backend_info()
    # The last quantize lowering for CUDA took a native target (not the reference).
    assert info["lowered"].get("quantize[cuda]") in ("jaxfp4_quantize", "jaxfp4_quantize_dynamic"), info["lowered"]
    assert str(info["kernels_run"].get("quantize", "")).startswith("sm90_quantize"), info["kernels_run"]
    assert t.sf_layout == layout
    return np.asarray(t.data), _bits(t.scales), np.asarray(t.global_scale)


def run_ref(x: np.ndarray, g: np.ndarray | None, layout: str):
    """jaxfp4.reference.quantize on the CPU device, op by op (NOT under jax.jit:
    XLA's algebraic simplifier rewrites e.g. 1/(1/g) into g inside one
    computation, which changes bits the spec fixes)."""
    with jax.default_device(_cpu()):
        xc = jax.device_put(x, _cpu())
        gc = None if g is None else jax.device_put(g, _cpu())
        data, scales, gg = reference.quantize(xc, gc, sf_layout=layout)
    return np.asarray(data), _bits(scales), np.asarray(gg)


def _who_is_right(x, g, layout, gpu, ref) -> str:
    """On a mismatch: which side agrees with the independent numpy oracle."""
    want = oracle.quantize(np.asarray(x, np.float32), g, layout)
    agree = lambda got: all(np.array_equal(_bits(np.asarray(a)), _bits(np.asarray(b)))
                            for a, b in zip(got, want))
    return f"gpu==oracle: {agree(gpu)}, reference==oracle: {agree(ref)}"


def padding_mask(lead: tuple[int, ...], m: int, k: int, layout: str) -> np.ndarray:
    """True at every padded byte of the [*lead, Rp, Cp] scale array."""
    rp, cp = fmt.scale_shape(m, k, layout)
    c = k // fmt.BLOCK
    valid = np.zeros(rp * cp, bool)
    for row in range(m):
        for col in range(c):
            valid[fmt.scale_offset(row, col, k, layout)] = True
    return np.broadcast_to(~valid.reshape(rp, cp), (*lead, rp, cp))


def check(x: np.ndarray, g: np.ndarray | None, layout: str, what: str = "") -> None:
    """GPU == reference, bit for bit, including every padded scale byte (0x00)."""
    data, scales, gg = run_gpu(x, g, layout)
    rdata, rscales, rg = run_ref(x, g, layout)
    *lead, m, k = x.shape
    tag = f"{what} x{x.shape} {x.dtype} layout={layout} g={'dynamic' if g is None else 'static'}"
    same = (np.array_equal(data, rdata) and np.array_equal(scales, rscales)
            and (g is not None or np.array_equal(_bits(gg), _bits(rg))))
    if not same:
        tag += " [" + _who_is_right(x, g, layout, (data, scales, gg), (rdata, rscales, rg)) + "]"
    assert data.shape == rdata.shape and scales.shape == rscales.shape, tag
    if g is None:
        np.testing.assert_array_equal(_bits(gg), _bits(rg), err_msg=f"global scale differs: {tag}")
    mask = padding_mask(tuple(lead), m, k, layout)
    assert not scales[mask].any(), f"padded scale bytes not 0x00: {tag}"
    bad = np.argwhere(scales != rscales)
    assert bad.size == 0, f"{len(bad)} scale bytes differ, first at {bad[0]}: {tag}"
    bad = np.argwhere(data != rdata)
    assert bad.size == 0, (f"{len(bad)} data bytes differ, first at {bad[0]} "
                           f"(gpu {data[tuple(bad[0])]:#04x} ref {rdata[tuple(bad[0])]:#04x}): {tag}")


def random_x(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Normal values with a random magnitude per 16-block (1e-6 .. 1e4), so block
    scales span E4M3's normal and subnormal range; cast to `dtype`."""
    *lead, m, k = shape
    x = rng.standard_normal(shape).astype(np.float32)
    mag = 10.0 ** rng.uniform(-6, 4, size=(*lead, m, k // 16, 1)).astype(np.float32)
    x = (x.reshape(*lead, m, k // 16, 16) * mag).reshape(shape)
    if dtype == np.float16:
        x = np.clip(x, -60000, 60000)
    return x.astype(dtype)


def random_g(rng: np.random.Generator, lead: tuple[int, ...]) -> np.ndarray:
    return (10.0 ** rng.uniform(-4, 1, size=lead)).astype(np.float32)


# ---- fresh random data -------------------------------------------------------------

@pytest.mark.parametrize("m", list(range(1, 34)))
def test_ragged_rows(rng, m):
    """Every M in 1..33 (layouts, dtypes, K and static/dynamic g rotate with M)."""
    layout = LAYOUTS[m % 3]
    dtype = DTYPES[(m // 3) % 3]
    k = K_VALUES[m % 4]
    x = random_x(rng, (m, k), dtype)
    check(x, random_g(rng, ()) if m % 2 else None, layout)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_dtypes(rng, layout, dtype, dynamic):
    """Each layout x dtype x g mode on larger ragged shapes (M 127/129/300, every K)."""
    for m, k in ((127, 272), (129, 48), (300, 4096), (32, 16)):
        x = random_x(rng, (m, k), dtype)
        check(x, None if dynamic else random_g(rng, ()), layout)


@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["L3", "L2x3"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_axes(rng, layout, lead):
    """Leading batch axes: one g per entry (static), one amax per entry (dynamic)."""
    for m, k, dtype in ((5, 48, ml_dtypes.bfloat16), (129, 272, np.float32)):
        x = random_x(rng, (*lead, m, k), dtype)
        check(x, random_g(rng, lead), layout, "batched static")
        # Very different magnitudes per entry: each dynamic g must be its own.
        x = x * (10.0 ** np.arange(np.prod(lead)).reshape(lead)[..., None, None]).astype(dtype)
        check(x.astype(dtype), None, layout, "batched dynamic")


@pytest.mark.parametrize("x_lead,g_lead", [((3,), (1,)), ((2, 3), (2, 1)), ((1, 3), (2, 3))],
                         ids=["g-one", "g-partial", "x-broadcast"])
def test_broadcast_batch_axes_ffi(rng, x_lead, g_lead):
    """The FFI target itself broadcasts size-1 batch axes of g to x's (called
    directly: jaxfp4.quantize broadcasts g before the call); the results have
    x's batch axes, so an x that would have to broadcast is an error (as on the CPU)."""
    m, k, layout = 9, 48, "8x4"
    out_lead = tuple(np.broadcast_shapes(x_lead, g_lead))
    x = random_x(rng, (*x_lead, m, k), np.float32)
    g = random_g(rng, g_lead)
    call = jax.ffi.ffi_call("jaxfp4_quantize", (
        jax.ShapeDtypeStruct((*out_lead, m, k // 2), jnp.uint8),
        jax.ShapeDtypeStruct((*out_lead, *fmt.scale_shape(m, k, layout)), jnp.float8_e4m3fn)))
    run = lambda: jax.block_until_ready(jax.jit(
        lambda x, g: call(x, g, sf_layout=np.int32(fmt.SF_LAYOUT_IDS[layout])))(
            jax.device_put(x, _gpu()), jax.device_put(g, _gpu())))
    if out_lead != x_lead:
        with pytest.raises(Exception, match="INVALID_ARGUMENT|jaxfp4_quantize"):
            run()
        return
    data, scales = run()
    rdata, rscales, _ = run_ref(x, np.broadcast_to(g, out_lead).copy(), layout)
    np.testing.assert_array_equal(np.asarray(data), rdata)
    np.testing.assert_array_equal(_bits(scales), rscales)


# ---- edge-case blocks ----------------------------------------------------------------

def edge_blocks(dtype) -> np.ndarray:
    """[8, 64] rows of special 16-blocks (4 blocks a row), values chosen for g = 1."""
    tiny = 1e-7 if dtype == np.float16 else 1e-30
    ties = np.array([6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.25, -.75, -1.25, -1.75, -2.5, -3.5, -5, -6])
    blocks = [
        np.zeros(16),                                   # all zero: SF 0, codes 0
        -np.zeros(16),                                  # negative zeros: codes 0x8
        np.full(16, tiny) * np.sign(np.arange(16) - 7.5),  # underflowing sfv: SF 0, 0x0/0x8
        ties,                                           # SF 1.0 and exact E2M1 ties
        np.where(np.arange(16) == 3, np.nan, 1.0),      # NaN: SF 0x7F, all codes 0x7
        np.where(np.arange(16) == 0, np.inf, 0.5),      # +Inf: SF 448, Inf -> 6
        np.where(np.arange(16) == 15, -np.inf, -0.5),   # -Inf
        np.linspace(-1e4, 1e4, 16),                     # large
        np.linspace(0, 0.01, 16),                       # subnormal E4M3 scale
        np.full(16, 2.0 ** -9),                         # near the E4M3 underflow edge
        np.full(16, 3.0 * 2.0 ** -10),
        ties * 448 * 6 / 6,                             # SF saturates at 448 exactly
        np.where(np.arange(16) % 2 == 0, np.nan, np.inf),
        np.arange(16) - 8.0,
        np.full(16, 65504.0 if dtype == np.float16 else 3e38),
        (np.arange(16) / 15.0) * 0.75,
    ]
    rows = []
    for i in range(8):
        rows.append(np.concatenate([blocks[(4 * i + j) % len(blocks)] for j in range(4)]))
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_edge_blocks(layout, dtype):
    x = edge_blocks(dtype).astype(dtype)
    for g in (np.float32(1.0), np.float32(1e-6), np.float32(3.0e3), None):
        check(x, None if g is None else np.asarray(g), layout, f"edge g={g}")
    # Only NaN/Inf besides zeros: the finite amax is 0, so the dynamic g is 1.
    y = np.zeros((3, 32), np.float32)
    y[0, 1], y[1, 17], y[2, 5] = np.nan, np.inf, -np.inf
    check(y.astype(dtype), None, layout, "no finite non-zero")
    check(np.zeros((2, 48), dtype), None, layout, "all zero")


def test_edge_blocks_batched_dynamic():
    """NaN/Inf in one batch entry must not change another entry's g."""
    x = np.stack([edge_blocks(np.float32), np.ones((8, 64), np.float32) * 3])
    for layout in LAYOUTS:
        check(x, None, layout, "batched edge")


# ---- memory independence, errors, many calls in one program -------------------------

def test_padding_written_regardless_of_prior_memory(rng):
    """Fill a large device region with 0xFF (a NaN pattern), free it, then quantize
    twice: results equal the reference both times and every pad byte is 0x00."""
    for layout in ("128x4", "8x4"):
        for dynamic in (False, True):
            poison = jax.device_put(np.full(64 << 20, 0xFF, np.uint8), _gpu())
            poison = jnp.tile(poison, 4)  # 256 MB of 0xFF on the device
            poison.block_until_ready()
            del poison
            x = random_x(rng, (2, 3, 64), np.float32)
            g = None if dynamic else random_g(rng, (2,))
            first = run_gpu(x, g, layout)
            check(x, g, layout, "after poisoning")
            second = run_gpu(x, g, layout)
            for a, b in zip(first, second):
                np.testing.assert_array_equal(_bits(a), _bits(b))


def test_many_calls_in_one_program(rng):
    """Several static and dynamic quantizations in one jit (XLA may record them
    into one command buffer / CUDA graph): each must match, on two different inputs."""
    layout = "8x4"
    n = 8

    @jax.jit
    def many(xs, g):
        outs = []
        for i, x in enumerate(xs):
            t = jaxfp4.quantize(x, None if i % 2 else g, sf_layout=layout)
            outs.append((t.data, t.scales, t.global_scale))
        return outs

    for _ in range(2):
        xs = [random_x(rng, (4 + i, 64), ml_dtypes.bfloat16) for i in range(n)]
        g = random_g(rng, ())
        outs = many([jax.device_put(x, _gpu()) for x in xs], jax.device_put(g, _gpu()))
        for i, (x, (data, scales, gg)) in enumerate(zip(xs, outs)):
            rdata, rscales, rg = run_ref(x, None if i % 2 else g, layout)
            np.testing.assert_array_equal(np.asarray(data), rdata)
            np.testing.assert_array_equal(_bits(scales), rscales)
            np.testing.assert_array_equal(_bits(gg), _bits(rg))


def test_handler_rejects_bad_shapes():
    """The handler itself returns an error (no crash) on inconsistent results."""
    x = jax.device_put(np.ones((4, 32), np.float32), _gpu())
    g = jax.device_put(np.ones((), np.float32), _gpu())
    bad = jax.ffi.ffi_call("jaxfp4_quantize",
                           (jax.ShapeDtypeStruct((4, 17), jnp.uint8),
                            jax.ShapeDtypeStruct((128, 4), jnp.float8_e4m3fn)))
    with pytest.raises(Exception, match="jaxfp4_quantize"):
        jax.block_until_ready(jax.jit(lambda x, g: bad(x, g, sf_layout=np.int32(1)))(x, g))
    bad_layout = jax.ffi.ffi_call("jaxfp4_quantize",
                                  (jax.ShapeDtypeStruct((4, 16), jnp.uint8),
                                   jax.ShapeDtypeStruct((4, 2), jnp.float8_e4m3fn)))
    with pytest.raises(Exception, match="sf_layout"):
        jax.block_until_ready(jax.jit(lambda x, g: bad_layout(x, g, sf_layout=np.int32(7)))(x, g))
    bad_dtype = jax.ffi.ffi_call("jaxfp4_quantize_dynamic",
                                 (jax.ShapeDtypeStruct((4, 16), jnp.uint8),
                                  jax.ShapeDtypeStruct((4, 2), jnp.float8_e4m3fn),
                                  jax.ShapeDtypeStruct((), jnp.float32)))
    xi = jax.device_put(np.ones((4, 32), np.int32), _gpu())
    with pytest.raises(Exception, match="jaxfp4_quantize_dynamic"):
        jax.block_until_ready(jax.jit(lambda x: bad_dtype(x, sf_layout=np.int32(0)))(xi))


# ---- quantize_decoded (gemm's decoded W4A4 route) ----------------------------------------

@functools.cache
def _decoded_fn():
    from jaxfp4.primitives.quantize import quantize_decoded_p

    return jax.jit(quantize_decoded_p.bind)


def run_decoded(x: np.ndarray, g: np.ndarray, g_b: np.ndarray):
    """jaxfp4_quantize_decoded on the GPU and on the CPU device (the CPU handler):
    ((values, g * g_b) from the GPU, the same from the CPU)."""
    on = lambda dev: [np.asarray(r) for r in _decoded_fn()(*(jax.device_put(v, dev) for v in (x, g, g_b)))]
    got = on(_gpu())
    assert jaxfp4.backend_info()["kernels_run"]["quantize"] == "sm90_quantize_decoded"
    return got, on(_cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,g_lead", [((1, 16), ()), ((7, 48), ()), ((33, 272), ()), ((16, 4096), ()),
                                          ((32, 14336), ()), ((2, 9, 272), (2,)), ((3, 2, 5, 48), (1, 2))])
def test_quantize_decoded(rng, dtype, shape, g_lead):
    """The values quantize(x, g) stands for without g (e2m1 x SF in bf16) and g * g_b:
    the CUDA kernel equals the CPU handler, itself checked against the reference, bit
    for bit. Device memory is poisoned with 0xFF first, so an unwritten element fails."""
    x = random_x(rng, shape, dtype)
    g, g_b = random_g(rng, g_lead), random_g(rng, g_lead)
    poison = jax.device_put(np.full(64 << 20, 0xFF, np.uint8), _gpu())
    poison.block_until_ready()
    del poison
    (got, got_g), (want, want_g) = run_decoded(x, g, g_b)
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == x.shape
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(got_g.view(np.uint32), want_g.view(np.uint32))
    np.testing.assert_array_equal(got_g, np.float32(g) * np.float32(g_b))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_decoded_edge_blocks(dtype):
    """NaN, Inf, -0, zero and underflowing blocks: the same values as the CPU handler
    (NaN-aware: the two may spell a NaN differently)."""
    from data import edge_blocks

    x = edge_blocks().astype(dtype)
    (got, _), (want, _) = run_decoded(x, np.float32(0.01), np.float32(3.0))
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
    assert np.array_equal(np.signbit(got.astype(np.float32)), np.signbit(want.astype(np.float32)))


def test_quantize_decoded_rejects_bad_shapes():
    """The CUDA handler's own checks (reached by an ffi_call that bypasses the
    Python ones): K % 16, the results' shapes and dtypes, g's and g_b's shapes."""
    def call(shape, dtype, g_shape=()):
        return jax.ffi.ffi_call("jaxfp4_quantize_decoded", (jax.ShapeDtypeStruct(shape, dtype),
                                                             jax.ShapeDtypeStruct(g_shape, jnp.float32)))

    one = jnp.ones((), jnp.float32)
    x = jax.device_put(np.ones((4, 40), ml_dtypes.bfloat16), _gpu())
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(call((4, 40), jnp.bfloat16)(x, one, one))
    x = jax.device_put(np.ones((4, 48), ml_dtypes.bfloat16), _gpu())
    with pytest.raises(Exception, match="x's shape"):
        jax.block_until_ready(call((4, 32), jnp.bfloat16)(x, one, one))
    with pytest.raises(Exception, match="BF16"):
        jax.block_until_ready(call((4, 48), jnp.float32)(x, one, one))
    with pytest.raises(Exception, match="g must have"):
        jax.block_until_ready(call((4, 48), jnp.bfloat16, (3,))(x, jnp.ones((3,), jnp.float32), jnp.ones((3,))))
    with pytest.raises(Exception, match="g's shape"):
        jax.block_until_ready(call((4, 48), jnp.bfloat16)(x, one, jnp.ones((2,), jnp.float32)))
