"""NVFP4 checkpoints on disk: load ModelOpt or compressed-tensors, save ModelOpt.

A checkpoint is a directory with `config.json`, the quantization config and
`*.safetensors` files (sharded ones with `model.safetensors.index.json`). Both
formats store, for a quantized Linear of weight [N, K] (the checkpoint
orientation, K % 16 == 0) under a prefix P, the same codes and block scales:

  what                          ModelOpt (quant_algo NVFP4)   compressed-tensors (nvfp4-pack-quantized)
  E2M1 codes, uint8 [N, K/2]    P.weight                      P.weight_packed
  E4M3 scales [N, K/16] linear  P.weight_scale                P.weight_scale
  weight global scale, float32  P.weight_scale_2 = g_b        P.weight_global_scale = 1/g_b
  input global scale (optional) P.input_scale = g_a           P.input_global_scale = 1/g_a
  bias (optional)               P.bias                        P.bias

Scale convention: jaxfp4 always uses the DECODE scale g, x ~= e2m1 * SF * g
(ModelOpt stores g; compressed-tensors stores the encode scale 1/g). Loading
passes the code and scale bytes through unchanged and takes ModelOpt's g as it
is; for compressed-tensors it computes g = float32(1) / stored in float32 --
the only arithmetic here. That division is correctly rounded, but 1/(1/g) need
not be g bit for bit, and compressed-tensors itself divides by the stored
scale, so results can differ from it in the last bit (they agree exactly when
the stored scale is a power of two).

Format detection: `hf_quant_config.json` with quantization.quant_algo "NVFP4",
or config.json `quantization_config` with quant_method "modelopt" (quant_algo
"NVFP4") is ModelOpt; quant_method "compressed-tensors" with format
"nvfp4-pack-quantized" is compressed-tensors. Anything else is a ValueError.

Tensors are read straight from the safetensors bytes (the 8-byte header
length, the JSON header, then raw little-endian data), so float8_e4m3fn and
bfloat16 arrive exactly as stored (as ml_dtypes arrays) with no framework
conversion. `load` reads only the headers; each entry of `Checkpoint.linears`
and `Checkpoint.tensors` is read from disk when it is accessed (not cached).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxfp4 import format as fmt
from jaxfp4 import ops
from jaxfp4.tensor import NVFP4Tensor

MODELOPT, COMPRESSED_TENSORS = "modelopt", "compressed-tensors"
INDEX_FILE = "model.safetensors.index.json"

# Per format: the suffix of each role under a Linear prefix P.
_ROLES = {
    MODELOPT: dict(weight="weight", scale="weight_scale", g="weight_scale_2", g_a="input_scale"),
    COMPRESSED_TENSORS: dict(weight="weight_packed", scale="weight_scale", g="weight_global_scale",
                             g_a="input_global_scale"),
}
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
           "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class LinearWeights:
    """One quantized Linear, y = x @ W.T (+ bias).

    Attributes:
      weight: NVFP4Tensor [N, K], sf_layout "linear", plain (unpacked) order,
        global_scale the weight's decode scale g_b (float32, shape ()).
      input_scale: the activations' static decode scale g_a (float32, shape ()),
        or None (e.g. weight-only checkpoints).
      bias: [N] or None.
    """

    weight: NVFP4Tensor
    input_scale: jax.Array | None = None
    bias: jax.Array | None = None


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lives, from its file's header."""

    file: Path
    dtype: str          # the safetensors dtype name, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    start: int          # absolute byte offsets in the file
    stop: int


def _read_header(file: Path) -> dict[str, _Entry]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {key: _Entry(file, info["dtype"], tuple(info["shape"]), 8 + n + info["data_offsets"][0],
                        8 + n + info["data_offsets"][1])
            for key, info in header.items() if key != "__metadata__"}


def _read(key: str, e: _Entry) -> np.ndarray:
    """The tensor's stored bytes, reinterpreted as its dtype (never converted)."""
    if e.dtype not in _DTYPES:
        raise ValueError(f"{key!r} (in {e.file.name}): unsupported safetensors dtype {e.dtype}")
    dtype = np.dtype(_DTYPES[e.dtype])
    buf = bytearray(e.stop - e.start)
    with open(e.file, "rb") as f:
        f.seek(e.start)
        got = f.readinto(buf)
    if got != len(buf) or len(buf) != dtype.itemsize * int(np.prod(e.shape)):
        raise ValueError(f"{key!r} (in {e.file.name}): {len(buf)} bytes stored (read {got}) do not hold "
                         f"{e.dtype} {list(e.shape)}")
    return np.frombuffer(buf, dtype).reshape(e.shape)


class _LazyMapping(Mapping):
    """A read-only mapping whose values are produced by `read(key)` on access."""

    def __init__(self, keys: list[str], read: Callable[[str], Any], what: str):
        self._keys, self._set, self._get, self._what = keys, set(keys), read, what

    def __getitem__(self, key: str) -> Any:
        if key not in self._set:
            raise KeyError(key)
        return self._get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<{len(self)} lazy {self._what}>"


class Checkpoint:
    """An NVFP4 checkpoint opened by `load` (headers read; tensor data read on access).

    Attributes:
      path: the checkpoint directory.
      format: "modelopt" or "compressed-tensors".
      config: the dict of config.json ({} when absent).
      linears: read-only Mapping prefix -> LinearWeights of the quantized
        Linears, each read and value-checked when accessed.
      tensors: read-only Mapping name -> np.ndarray of every other tensor
        (embeddings, norms, an unquantized lm_head, ...), read when accessed;
        floating ones are cast to `dtype` when load was given one.
    """

    def __init__(self, path: Path, format: str, config: dict, entries: dict[str, _Entry], dtype: Any):
        self.path, self.format, self.config = path, format, config
        self._entries, self._dtype = entries, None if dtype is None else np.dtype(dtype)
        self._roles = roles = _ROLES[format]
        # A prefix is a quantized Linear if it has a scale or global scale, or (ModelOpt,
        # whose unquantized Linears also store P.weight) uint8 codes.
        prefixes = sorted({k.rsplit(".", 1)[0] for k, e in entries.items() if "." in k and (
            k.rsplit(".", 1)[1] in (roles["scale"], roles["g"])
            or k.rsplit(".", 1)[1] == roles["weight"] and (format == COMPRESSED_TENSORS or e.dtype == "U8"))})
        for p in prefixes:
            self._check_linear(p)
        used = {f"{p}.{s}" for p in prefixes for s in (*roles.values(), "bias", "weight_shape")}
        self.linears: Mapping[str, LinearWeights] = _LazyMapping(prefixes, self._linear, "linears")
        self.tensors: Mapping[str, np.ndarray] = _LazyMapping(
            sorted(k for k in entries if k not in used), self._tensor, "tensors")

    def names(self) -> list[str]:
        """Sorted names of everything stored: the Linear prefixes and the other tensors' names."""
        return sorted([*self.linears, *self.tensors])

    def __repr__(self) -> str:
        files = len({e.file for e in self._entries.values()})
        return (f"Checkpoint({str(self.path)!r}, format={self.format!r}, linears={len(self.linears)}, "
                f"tensors={len(self.tensors)}, files={files})")

    # ---- checks on the headers (at load) and on the values (on access) ------------------

    def _where(self, key: str) -> str:
        return f"{key!r} (in {self._entries[key].file.name})"

    def _check_linear(self, p: str) -> None:
        r, e = self._roles, self._entries
        keys = {role: f"{p}.{suffix}" for role, suffix in r.items()}
        for role in ("weight", "scale", "g"):
            if keys[role] not in e:
                present = sorted(k for k in e if k.startswith(p + "."))
                raise ValueError(f"{keys[role]!r} is missing: a {self.format} NVFP4 linear needs "
                                 f"{p}.{r['weight']}, {p}.{r['scale']} and {p}.{r['g']} (found {present}, "
                                 f"in {e[present[0]].file.name})")
        for role, want in (("weight", "U8"), ("scale", "F8_E4M3"), ("g", "F32"), ("g_a", "F32")):
            if keys[role] in e and e[keys[role]].dtype != want:
                raise ValueError(f"{self._where(keys[role])}: dtype must be {want} "
                                 f"({np.dtype(_DTYPES[want]).name}), got {e[keys[role]].dtype}")
        for role in ("g", "g_a"):
            if keys[role] in e and e[keys[role]].shape not in ((), (1,)):
                raise ValueError(f"{self._where(keys[role])}: a global scale must be a scalar "
                                 f"(shape [] or [1]), got {list(e[keys[role]].shape)}")
        w, s = e[keys["weight"]].shape, e[keys["scale"]].shape
        if len(w) != 2 or (2 * w[1]) % fmt.BLOCK:
            raise ValueError(f"{self._where(keys['weight'])}: must be [N, K/2] codes with K % {fmt.BLOCK} == 0, "
                             f"got {list(w)}")
        n, k = w[0], 2 * w[1]
        if s != (n, k // fmt.BLOCK):
            raise ValueError(f"{self._where(keys['scale'])}: must be the linear [N, K/16] = {[n, k // fmt.BLOCK]} "
                             f"for weight [N, K/2] = {list(w)}, got {list(s)}")
        if f"{p}.bias" in e and e[f"{p}.bias"].shape != (n,):
            raise ValueError(f"{self._where(p + '.bias')}: must be [N] = [{n}], got {list(e[p + '.bias'].shape)}")

    def _scale(self, key: str) -> np.ndarray:
        """A decode scale g (float32, shape ()): stored (ModelOpt) or 1/stored (compressed-tensors)."""
        x = _read(key, self._entries[key]).reshape(())
        if not (np.isfinite(x) and x > 0):
            raise ValueError(f"{self._where(key)}: a global scale must be finite and > 0, got {x}")
        if self.format == COMPRESSED_TENSORS:
            with np.errstate(over="ignore"):
                x = np.float32(1) / x    # stored is the encode scale 1/g; float32 division
            if not np.isfinite(x):
                raise ValueError(f"{self._where(key)}: 1/{x} (the decode scale) overflows float32")
        return np.asarray(x, np.float32)

    # ---- readers -------------------------------------------------------------------

    def _linear(self, p: str) -> LinearWeights:
        r, e = self._roles, self._entries
        data = _read(f"{p}.{r['weight']}", e[f"{p}.{r['weight']}"])
        scales = _read(f"{p}.{r['scale']}", e[f"{p}.{r['scale']}"])
        if f"{p}.weight_shape" in e:   # compressed-tensors may record the logical [N, K]
            shape = _read(f"{p}.weight_shape", e[f"{p}.weight_shape"]).tolist()
            if shape != [data.shape[0], 2 * data.shape[1]]:
                raise ValueError(f"{self._where(p + '.weight_shape')}: {shape} disagrees with the codes "
                                 f"[N, K/2] = {list(data.shape)}")
        g_a = f"{p}.{r['g_a']}"
        weight = NVFP4Tensor(jnp.asarray(data), jnp.asarray(scales), jnp.asarray(self._scale(f"{p}.{r['g']}")),
                             "linear")
        return LinearWeights(weight, jnp.asarray(self._scale(g_a)) if g_a in e else None,
                             jnp.asarray(self._tensor(f"{p}.bias")) if f"{p}.bias" in e else None)

    def _tensor(self, name: str) -> np.ndarray:
        x = _read(name, self._entries[name])
        return x.astype(self._dtype) if self._dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def _detect(root: Path, config: dict) -> str:
    """The checkpoint's format, from hf_quant_config.json or config.json's quantization_config."""
    hf = root / "hf_quant_config.json"
    if hf.exists():
        algo = _read_json(hf).get("quantization", {}).get("quant_algo")
        if algo != "NVFP4":
            raise ValueError(f"{hf}: quantization.quant_algo must be 'NVFP4', got {algo!r}")
        return MODELOPT
    qc = config.get("quantization_config")
    where = f"{root / 'config.json'}: quantization_config"
    if not isinstance(qc, dict):
        raise ValueError(f"{root}: no NVFP4 quantization config: expected hf_quant_config.json "
                         f"(ModelOpt) or config.json 'quantization_config' (modelopt or compressed-tensors)")
    method = qc.get("quant_method")
    if method == "modelopt":
        algo = qc.get("quant_algo", qc.get("quantization", {}).get("quant_algo"))
        if algo != "NVFP4":
            raise ValueError(f"{where}.quant_algo must be 'NVFP4', got {algo!r}")
        return MODELOPT
    if method == "compressed-tensors":
        formats = {qc.get("format")} - {None, "mixed-precision"} or {
            g.get("format") for g in qc.get("config_groups", {}).values()}
        if formats != {"nvfp4-pack-quantized"}:
            raise ValueError(f"{where}.format must be 'nvfp4-pack-quantized', got {sorted(map(str, formats))}")
        return COMPRESSED_TENSORS
    raise ValueError(f"{where}.quant_method must be 'modelopt' or 'compressed-tensors', got {method!r}")


def load(path: str | os.PathLike, *, dtype: Any = None) -> Checkpoint:
    """Opens the NVFP4 checkpoint directory `path` (ModelOpt or compressed-tensors).

    Reads the config files and the safetensors headers only, and checks every
    quantized Linear's names, dtypes and shapes there; tensor data (and the
    global-scale values: finite, > 0) are read and checked on access.
    `dtype` casts the floating non-quantized tensors and biases on access.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a checkpoint directory")
    config = _read_json(root / "config.json") if (root / "config.json").exists() else {}
    format = _detect(root, config)
    entries: dict[str, _Entry] = {}
    if (root / INDEX_FILE).exists():
        weight_map = _read_json(root / INDEX_FILE).get("weight_map", {})
        headers = {f: _read_header(root / f) for f in sorted(set(weight_map.values()))}
        for key, f in weight_map.items():
            if key not in headers[f]:
                raise ValueError(f"{root / INDEX_FILE}: weight_map puts {key!r} in {f}, which does not hold it")
            entries[key] = headers[f][key]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{root}: no *.safetensors files")
        for file in files:
            for key, entry in _read_header(file).items():
                if key in entries:
                    raise ValueError(f"{key!r} is stored twice: in {entries[key].file.name} and {file.name}")
                entries[key] = entry
    return Checkpoint(root, format, config, entries, dtype)


def _linear_arrays(p: str, lw: LinearWeights | NVFP4Tensor) -> dict[str, np.ndarray]:
    """The ModelOpt tensors of one Linear (exact: plain order, linear scales)."""
    lw = LinearWeights(lw) if isinstance(lw, NVFP4Tensor) else lw
    if not isinstance(lw, LinearWeights):
        raise TypeError(f"linears[{p!r}] must be a LinearWeights or an NVFP4Tensor, got {type(lw).__name__}")
    t = ops.unprepare_weights(lw.weight)
    if t.batch_shape:
        raise ValueError(f"linears[{p!r}]: batched weights {t!r} are not a Linear: save one [N, K] tensor each")
    t = t.with_sf_layout("linear")
    out = {f"{p}.weight": np.asarray(t.data), f"{p}.weight_scale": np.asarray(t.scales)}
    for name, g in (("weight_scale_2", t.global_scale), ("input_scale", lw.input_scale)):
        if g is not None:
            g = np.asarray(g, np.float32)
            if g.size != 1 or not (np.isfinite(g) and g > 0).all():
                raise ValueError(f"linears[{p!r}]: {name} must be one finite float32 > 0, got {g}")
            out[f"{p}.{name}"] = g.reshape(())
    if lw.bias is not None:
        out[f"{p}.bias"] = np.asarray(lw.bias)
    return out


def save(path: str | os.PathLike, linears: Mapping[str, LinearWeights | NVFP4Tensor],
         tensors: Mapping[str, Any] = {}, *, config: dict | None = None,
         max_shard_bytes: int | None = None) -> None:
    """Writes a ModelOpt NVFP4 checkpoint into the directory `path`.

    Args:
      linears: prefix -> LinearWeights (or a bare NVFP4Tensor weight) of shape
        [N, K]; any sf_layout and pre-packed (prepare_weights) weights are
        converted exactly to the checkpoint's plain order and linear scales.
      tensors: name -> array of the other tensors, written as they are.
      config: the model's config.json content; its quantization_config is
        replaced by ModelOpt's (default: a config with only that).
      max_shard_bytes: None writes model.safetensors; a size writes shards of at
        most that many bytes (a Linear's tensors stay together; a bigger one gets
        a shard of its own) and model.safetensors.index.json.

    Also writes hf_quant_config.json (quant_algo NVFP4, group_size 16,
    exclude_modules: the prefixes of 2-D `*.weight` entries of `tensors`).
    """
    from safetensors.numpy import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.glob("*.safetensors")) or (root / INDEX_FILE).exists():
        raise ValueError(f"{root} already holds safetensors files: save into a new or empty directory")
    groups = [_linear_arrays(p, lw) for p, lw in linears.items()]
    groups += [{name: np.asarray(x)} for name, x in tensors.items()]
    names = [k for grp in groups for k in grp]
    if len(set(names)) != len(names):
        dup = sorted({k for k in names if names.count(k) > 1})
        raise ValueError(f"tensor names {dup} occur twice (a tensors entry clashes with a linear's tensors)")
    limit = np.inf if max_shard_bytes is None else max_shard_bytes
    shards: list[dict[str, np.ndarray]] = [{}]
    for grp in groups:
        full = sum(x.nbytes for x in [*shards[-1].values(), *grp.values()]) > limit
        shards += [{}] if full and shards[-1] else []
        shards[-1].update(grp)
    files = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if max_shard_bytes is not None else ["model.safetensors"])
    for fname, shard in zip(files, shards):
        save_file({k: np.ascontiguousarray(v) for k, v in shard.items()}, root / fname, metadata={"format": "pt"})
    if max_shard_bytes is not None:
        index = {"metadata": {"total_size": sum(x.nbytes for s in shards for x in s.values())},
                 "weight_map": {k: f for f, s in zip(files, shards) for k in sorted(s)}}
        (root / INDEX_FILE).write_text(json.dumps(index, indent=2))
    exclude = sorted(k[:-7] for k, x in tensors.items() if k.endswith(".weight") and np.ndim(x) == 2)
    quant = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": fmt.BLOCK, "exclude_modules": exclude}
    (root / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "jaxfp4"}, "quantization": quant},
                                                          indent=2))
    cfg = dict(config or {})
    cfg["quantization_config"] = {"quant_method": MODELOPT, **quant}
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
