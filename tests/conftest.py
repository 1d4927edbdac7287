import os

# Several CPU devices for mesh tests; must precede jax's backend start-up.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _have_cuda_kernels() -> bool:
    try:
        import jaxfp4
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:
        return False
    return bool(gpus) and jaxfp4.backend_info()["cuda_build"]


def pytest_collection_modifyitems(config, items):
    if _have_cuda_kernels():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a jaxfp4 build with CUDA kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """Fresh random data on every run; the seed is printed (shown on failure)
    and JAXFP4_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("JAXFP4_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"JAXFP4_TEST_SEED={seed}")
    return np.random.default_rng(seed)
