"""Test inputs: random values spanning many binades, and the spec's edge cases."""

import numpy as np


def random_matrix(rng, shape, dtype=np.float32, spread: int = 6):
    """Normal values times a random power of two per 16-block (so block scales vary)."""
    x = rng.standard_normal(shape).astype(np.float32)
    k = shape[-1]
    exps = rng.integers(-spread, spread + 1, size=(*shape[:-1], k // 16)).astype(np.float32)
    x *= np.repeat(np.exp2(exps), 16, axis=-1)
    return x.astype(dtype)


def edge_blocks(k: int = 64) -> np.ndarray:
    """Rows exercising ties, -0, underflow, NaN, Inf and saturation (float32 [12, k])."""
    rows = []
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0, -6.0],
                    np.float32)
    rows.append(np.tile(ties, k // 16))                    # exact ties once scaled by SF = 1 (g chosen below)
    rows.append(np.full(k, -0.0, np.float32))              # all -0: SF 0, codes 0x8
    rows.append(np.zeros(k, np.float32))                   # all +0
    rows.append(np.full(k, 1e-30, np.float32) * np.sign(np.arange(k) - k / 2 + 0.5))  # underflowing blocks
    nan = np.ones(k, np.float32); nan[3] = np.nan          # NaN block -> SF 0x7F
    rows.append(nan)
    inf = np.ones(k, np.float32); inf[5] = np.inf; inf[20] = -np.inf  # Inf -> SF 448, codes +-6
    rows.append(inf)
    rows.append(np.linspace(-7, 7, k).astype(np.float32))
    rows.append(np.full(k, 3e38, np.float32))              # huge: saturates
    rows.append(np.array([-0.1, 6.0] + [0.0] * (k - 2), np.float32))  # SF 1: -0.1 rounds to -0 (0x8)
    rows.append(np.full(k, 2.0 ** -126, np.float32))       # float32 subnormal neighbourhood
    rows.append(np.arange(k, dtype=np.float32) - k / 2)
    rows.append(np.full(k, 448.0 * 6, np.float32))
    return np.stack(rows).astype(np.float32)
