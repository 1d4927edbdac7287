"""Loads the native extension, registers its XLA FFI targets, reports backends.

Import is cheap and never fails: without the extension (or without a CUDA
build) every op lowers to the pure-JAX reference, and `backend_info()` says so.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any

import jax
import jaxlib

try:  # the compiled nanobind module (CMakeLists.txt)
    _ext = importlib.import_module("jaxfp4._jaxfp4")
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _ext = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

# XLA platform name -> target names registered for it.
_REGISTERED: dict[str, frozenset[str]] = {}
_WARNED: set[tuple[str, str]] = set()
# (op, platform) -> the kernel/path each lowering chose last (see `note_lowering`).
_LOWERED: dict[str, str] = {}


def _register() -> None:
    if _ext is None:
        return
    for platform, getter in (("cpu", _ext.cpu_targets), ("CUDA", _ext.cuda_targets)):
        targets = getter()
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
        _REGISTERED[platform.lower()] = frozenset(targets)


_register()


def has_target(name: str, platform: str) -> bool:
    """Whether FFI target `name` is registered for lowering platform `platform`."""
    return name in _REGISTERED.get(platform.lower(), frozenset())


def note_lowering(op: str, platform: str, path: str, *, fallback: bool = False) -> None:
    """Records which path a lowering chose; warns once per (op, platform) on a fallback."""
    _LOWERED[f"{op}[{platform}]"] = path
    if fallback and (op, platform) not in _WARNED:
        _WARNED.add((op, platform))
        why = _IMPORT_ERROR or f"no native {op} handler for platform {platform!r} in this build"
        warnings.warn(f"jaxfp4: {op} on {platform} runs the pure-JAX reference (correct, slow): {why}",
                      RuntimeWarning, stacklevel=3)


@functools.cache
def _versions() -> dict[str, Any]:
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


def backend_info() -> dict[str, Any]:
    """What jaxfp4 can run here and what it ran.

    Keys: `extension` (loaded or the import error), `cuda_build` (CUDA kernels
    compiled in), `targets` (platform -> FFI targets), `lowered` ("op[platform]"
    -> path chosen at the last lowering: an FFI target, "reference" or an XLA
    path), `kernels_run` (op -> native kernel that op last ran), `devices`,
    `pdl` (the CUDA GEMM and quantize kernels are launched as programmatic
    dependents: they may start while the kernel before them finishes; the
    environment variable JAXFP4_PDL=0, set before the first launch, turns it off).
    """
    return {
        "extension": "loaded" if _ext is not None else f"missing ({_IMPORT_ERROR})",
        "cuda_build": bool(_ext is not None and _ext.built_with_cuda()),
        "targets": {p: sorted(t) for p, t in _REGISTERED.items()},
        "lowered": dict(_LOWERED),
        "kernels_run": dict(_ext.kernels_run()) if _ext is not None else {},
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "pdl": bool(_ext is not None and _ext.pdl_enabled()),  # (False in a build without CUDA)
        **_versions(),
    }
