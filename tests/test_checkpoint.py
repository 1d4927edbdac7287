"""jaxfp4.checkpoint: loading ModelOpt and compressed-tensors NVFP4 checkpoints, saving ModelOpt."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxfp4
from jaxfp4 import checkpoint
from jaxfp4.checkpoint import LinearWeights

from data import random_matrix

# (prefix, N, K): N never a power of two, K = 48 or 272
SHAPES = [("model.layers.0.self_attn.q_proj", 40, 48), ("model.layers.0.mlp.up_proj", 24, 272),
          ("model.layers.0.mlp.down_proj", 48, 272)]
HIDDEN, VOCAB = 48, 10


def _model(rng, pow2_scales=False):
    """Quantized Linears (linear scales) with input scales and a bias, and the plain tensors."""
    linears = {}
    for i, (p, n, k) in enumerate(SHAPES):
        g = np.float32(2.0 ** -9) if pow2_scales else None
        w = jaxfp4.quantize(random_matrix(rng, (n, k)), g, sf_layout="linear")
        g_a = np.float32(2.0 ** -7 if pow2_scales else rng.uniform(1e-3, 1e-2))
        bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16) if i == 0 else None
        linears[p] = LinearWeights(w, jnp.asarray(g_a), bias)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(ml_dtypes.bfloat16),
               "model.norm.weight": rng.standard_normal(HIDDEN).astype(ml_dtypes.bfloat16),
               "lm_head.weight": rng.standard_normal((VOCAB, HIDDEN)).astype(ml_dtypes.bfloat16)}
    return linears, tensors


BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
               "vocab_size": VOCAB, "num_hidden_layers": 1, "torch_dtype": "bfloat16"}


def _write(root, arrays, config, hf_quant=None, shards=1):
    """Writes arrays as model.safetensors, or `shards` files plus the index json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (root / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    keys = list(arrays)
    if shards == 1:
        save_file(arrays, root / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: arrays[k] for k in keys[i::shards]}   # interleaved: a Linear spans files
        save_file(part, root / name)
        weight_map.update(dict.fromkeys(part, name))
    (root / checkpoint.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _modelopt_arrays(linears, tensors, scalar_shape=()):
    out = dict(tensors)
    for p, lw in linears.items():
        out[f"{p}.weight"] = np.asarray(lw.weight.data)
        out[f"{p}.weight_scale"] = np.asarray(lw.weight.scales)
        out[f"{p}.weight_scale_2"] = np.asarray(lw.weight.global_scale).reshape(scalar_shape)
        out[f"{p}.input_scale"] = np.asarray(lw.input_scale).reshape(scalar_shape)
        if lw.bias is not None:
            out[f"{p}.bias"] = np.asarray(lw.bias)
    return out


def write_modelopt(root, linears, tensors, scalar_shape=(), shards=1):
    hf = {"producer": {"name": "modelopt", "version": "0.29.0"},
          "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                           "exclude_modules": ["lm_head"]}}
    _write(root, _modelopt_arrays(linears, tensors, scalar_shape), BASE_CONFIG, hf, shards)


CT_CONFIG = {**BASE_CONFIG, "quantization_config": {
    "config_groups": {"group_0": {
        "format": "nvfp4-pack-quantized", "output_activations": None, "targets": ["Linear"],
        "input_activations": {"dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "minmax",
                              "strategy": "tensor_group", "symmetric": True, "type": "float"},
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 16, "num_bits": 4,
                    "observer": "minmax", "strategy": "tensor_group", "symmetric": True, "type": "float"}}},
    "format": "nvfp4-pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
    "sparsity_config": {}, "version": "0.10.2"}}


def ct_arrays(linears, tensors):
    """compressed-tensors names; global scales stored as ENCODE scales 1/g ([1], float32)."""
    out = dict(tensors)
    for p, lw in linears.items():
        out[f"{p}.weight_packed"] = np.asarray(lw.weight.data)
        out[f"{p}.weight_scale"] = np.asarray(lw.weight.scales)
        out[f"{p}.weight_global_scale"] = (np.float32(1) / np.asarray(lw.weight.global_scale)).reshape(1)
        out[f"{p}.input_global_scale"] = (np.float32(1) / np.asarray(lw.input_scale)).reshape(1)
        if lw.bias is not None:
            out[f"{p}.bias"] = np.asarray(lw.bias)
    return out


def _bytes(x):
    return np.asarray(x).view(np.uint8) if np.asarray(x).dtype.itemsize == 1 else np.asarray(x)


def assert_same_linear(got, want, g=None):
    assert got.weight.sf_layout == "linear" and got.weight.packing is None and got.weight.shape == want.weight.shape
    np.testing.assert_array_equal(np.asarray(got.weight.data), np.asarray(want.weight.data))
    np.testing.assert_array_equal(_bytes(got.weight.scales), _bytes(want.weight.scales))
    assert got.weight.global_scale.shape == () and got.weight.global_scale.dtype == jnp.float32
    assert np.asarray(got.weight.global_scale).tobytes() == np.asarray(
        want.weight.global_scale if g is None else g, np.float32).tobytes()
    if want.bias is None:
        assert got.bias is None
    else:
        np.testing.assert_array_equal(np.asarray(got.bias), np.asarray(want.bias))


def assert_same_outputs(rng, got, want):
    """W4A16 and W4A4 (with the static input scale) matmuls agree bit for bit."""
    k = want.weight.shape[1]
    x = jnp.asarray(random_matrix(rng, (5, k), spread=2), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(jaxfp4.matmul(x, got.weight), np.float32),
                                  np.asarray(jaxfp4.matmul(x, want.weight), np.float32))
    a_got = jaxfp4.quantize(x, got.input_scale, sf_layout="8x4")
    a_want = jaxfp4.quantize(x, want.input_scale, sf_layout="8x4")
    np.testing.assert_array_equal(np.asarray(jaxfp4.matmul(a_got, got.weight), np.float32),
                                  np.asarray(jaxfp4.matmul(a_want, want.weight), np.float32))


@pytest.mark.parametrize("scalar_shape,shards", [((), 1), ((1,), 3)])
def test_load_modelopt_is_exact(rng, tmp_path, scalar_shape, shards):
    linears, tensors = _model(rng)
    write_modelopt(tmp_path, linears, tensors, scalar_shape, shards)
    ck = checkpoint.load(tmp_path)
    assert ck.format == "modelopt" and ck.config == BASE_CONFIG
    assert list(ck.linears) == sorted(linears) and list(ck.tensors) == sorted(tensors)
    assert ck.names() == sorted([*linears, *tensors])
    assert repr(ck).endswith(f"format='modelopt', linears=3, tensors=3, files={shards})")
    for p, want in linears.items():
        got = ck.linears[p]
        assert_same_linear(got, want)
        assert got.input_scale.shape == () and float(got.input_scale) == float(want.input_scale)
        assert_same_outputs(rng, got, want)
    for name, x in tensors.items():
        assert ck.tensors[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(ck.tensors[name], x)
    ck32 = checkpoint.load(tmp_path, dtype=jnp.float32)
    np.testing.assert_array_equal(ck32.tensors["model.norm.weight"], tensors["model.norm.weight"].astype(np.float32))
    assert ck32.linears[SHAPES[0][0]].bias.dtype == jnp.float32
    with pytest.raises(TypeError):
        ck.linears["x"] = None   # read-only


def test_load_compressed_tensors(rng, tmp_path):
    # power-of-two global scales: 1/(1/g) == g, so everything matches bit for bit
    linears, tensors = _model(rng, pow2_scales=True)
    _write(tmp_path / "a", ct_arrays(linears, tensors), CT_CONFIG)
    ck = checkpoint.load(tmp_path / "a")
    assert ck.format == "compressed-tensors" and list(ck.linears) == sorted(linears)
    assert sorted(ck.tensors) == sorted(tensors)
    for p, want in linears.items():
        assert_same_linear(ck.linears[p], want)
        assert float(ck.linears[p].input_scale) == float(want.input_scale)
        assert_same_outputs(rng, ck.linears[p], want)
    # dynamic (arbitrary) scales: g is exactly float32(1) / stored, nothing else; within an ulp of the original
    linears, tensors = _model(rng)
    arrays = ct_arrays(linears, tensors)
    _write(tmp_path / "b", arrays, {**CT_CONFIG, "quantization_config": {
        **CT_CONFIG["quantization_config"], "format": "mixed-precision"}}, shards=2)
    ck = checkpoint.load(tmp_path / "b")
    for p, want in linears.items():
        stored = arrays[f"{p}.weight_global_scale"][0]
        assert_same_linear(ck.linears[p], want, g=np.float32(1) / stored)
        np.testing.assert_array_max_ulp(np.asarray(ck.linears[p].weight.global_scale),
                                        np.asarray(want.weight.global_scale), 1)
        assert np.asarray(ck.linears[p].input_scale).tobytes() == (
            np.float32(1) / arrays[f"{p}.input_global_scale"][0]).tobytes()
    # converting to ModelOpt keeps the loaded codes, scales and g
    checkpoint.save(tmp_path / "c", ck.linears, ck.tensors, config=ck.config)
    back = checkpoint.load(tmp_path / "c")
    assert back.format == "modelopt" and back.config["quantization_config"]["quant_method"] == "modelopt"
    assert back.config["architectures"] == ["LlamaForCausalLM"] and sorted(back.tensors) == sorted(tensors)
    for p in linears:
        assert_same_linear(back.linears[p], ck.linears[p])
        assert float(back.linears[p].input_scale) == float(ck.linears[p].input_scale)


@pytest.mark.parametrize("layout,prepared,shard", [("linear", False, None), ("128x4", False, 4000),
                                                   ("128x4", True, None), ("8x4", True, 1)])
def test_save_round_trip(rng, tmp_path, layout, prepared, shard):
    linears, tensors = _model(rng)
    given = {}
    for i, (p, lw) in enumerate(linears.items()):
        w = lw.weight.with_sf_layout(layout)
        w = jaxfp4.prepare_weights(w) if prepared else w
        given[p] = w if i == 2 else LinearWeights(w, lw.input_scale, lw.bias)   # a bare NVFP4Tensor too
    checkpoint.save(tmp_path, given, tensors, config=BASE_CONFIG, max_shard_bytes=shard)
    ck = checkpoint.load(tmp_path)
    assert ck.format == "modelopt" and ck.config["model_type"] == "llama"
    assert ck.config["quantization_config"]["quant_algo"] == "NVFP4"
    hf = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert hf["group_size"] == 16 and hf["exclude_modules"] == ["lm_head", "model.embed_tokens"]
    files = sorted(f.name for f in tmp_path.glob("*.safetensors"))
    if shard is None:
        assert files == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / checkpoint.INDEX_FILE).read_text())
        assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
        # a Linear's tensors stay in one shard
        assert len({f for k, f in index["weight_map"].items() if k.startswith(SHAPES[1][0] + ".")}) == 1
    for i, (p, want) in enumerate(linears.items()):
        got = ck.linears[p]
        assert_same_linear(got, want if i != 2 else LinearWeights(want.weight))
        if i == 2:
            assert got.input_scale is None
        else:
            assert_same_outputs(rng, got, want)
    for name, x in tensors.items():
        np.testing.assert_array_equal(ck.tensors[name], x)


def test_save_rejects(rng, tmp_path):
    w = jaxfp4.quantize(random_matrix(rng, (2, 24, 48)))
    with pytest.raises(ValueError, match=r"linears\['a'\]: batched weights .* one \[N, K\] tensor each"):
        checkpoint.save(tmp_path / "a", {"a": w})
    w = jaxfp4.quantize(random_matrix(rng, (24, 48)))
    with pytest.raises(TypeError, match=r"linears\['a'\] must be a LinearWeights or an NVFP4Tensor"):
        checkpoint.save(tmp_path / "b", {"a": np.zeros((24, 48))})
    with pytest.raises(ValueError, match=r"\['a.weight'\] occur twice"):
        checkpoint.save(tmp_path / "c", {"a": w}, {"a.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"input_scale must be one finite float32 > 0"):
        checkpoint.save(tmp_path / "d", {"a": LinearWeights(w, jnp.float32(np.nan))})
    checkpoint.save(tmp_path / "e", {"a": w})
    with pytest.raises(ValueError, match="already holds safetensors files"):
        checkpoint.save(tmp_path / "e", {"a": w})


def test_entries_are_read_lazily(rng, tmp_path, monkeypatch):
    linears, tensors = _model(rng)
    write_modelopt(tmp_path, linears, tensors, shards=2)
    reads = []
    real = checkpoint._read
    monkeypatch.setattr(checkpoint, "_read", lambda key, entry: reads.append(key) or real(key, entry))
    ck = checkpoint.load(tmp_path)
    repr(ck), ck.names(), len(ck.linears)
    assert reads == []
    p = SHAPES[1][0]
    ck.linears[p]
    assert sorted(reads) == sorted(f"{p}.{s}" for s in ("weight", "weight_scale", "weight_scale_2", "input_scale"))
    reads.clear()
    ck.tensors["model.norm.weight"]
    assert reads == ["model.norm.weight"]


def _one(rng, n=24, k=48):
    w = jaxfp4.quantize(random_matrix(rng, (n, k)), sf_layout="linear")
    return _modelopt_arrays({"l": LinearWeights(w, jnp.float32(0.01))}, {"norm": np.ones(4, np.float32)})


HF = {"quantization": {"quant_algo": "NVFP4", "group_size": 16}}
F32 = np.float32
# (mutation of a one-Linear ModelOpt checkpoint, the message), raised by load() from the headers
HEADER_ERRORS = [
    (lambda a: a.pop("l.weight_scale"), r"'l.weight_scale' is missing: a modelopt NVFP4 linear needs l.weight, "
                                        r"l.weight_scale and l.weight_scale_2 .*in model.safetensors"),
    (lambda a: a.pop("l.weight_scale_2"), r"'l.weight_scale_2' is missing"),
    (lambda a: a.pop("l.weight"), r"'l.weight' is missing"),
    (lambda a: a.update({"l.weight": a["l.weight"].view(np.int8)}),
     r"'l.weight' \(in model.safetensors\): dtype must be U8 \(uint8\), got I8"),
    (lambda a: a.update({"l.weight_scale": a["l.weight_scale"].view(np.uint8)}),
     r"'l.weight_scale' \(in model.safetensors\): dtype must be F8_E4M3 \(float8_e4m3fn\), got U8"),
    (lambda a: a.update({"l.weight_scale_2": a["l.weight_scale_2"].astype(np.float16)}),
     r"'l.weight_scale_2' \(in model.safetensors\): dtype must be F32 \(float32\), got F16"),
    (lambda a: a.update({"l.input_scale": a["l.input_scale"].astype(np.float64)}),
     r"'l.input_scale' .*dtype must be F32"),
    (lambda a: a.update({"l.weight_scale_2": np.full(2, 0.1, F32)}),
     r"'l.weight_scale_2' .*must be a scalar \(shape \[\] or \[1\]\), got \[2\]"),
    (lambda a: a.update({"l.weight_scale": a["l.weight_scale"][:, :2]}),
     r"'l.weight_scale' .*must be the linear \[N, K/16\] = \[24, 3\] for weight \[N, K/2\] = \[24, 24\], "
     r"got \[24, 2\]"),
    (lambda a: a.update({"l.weight": a["l.weight"][:, :20]}),
     r"'l.weight' .*must be \[N, K/2\] codes with K % 16 == 0, got \[24, 20\]"),
    (lambda a: a.update({"l.bias": np.zeros(23, F32)}), r"'l.bias' .*must be \[N\] = \[24\], got \[23\]"),
]


@pytest.mark.parametrize("mutate,match", HEADER_ERRORS)
def test_header_errors(rng, tmp_path, mutate, match):
    arrays = _one(rng)
    mutate(arrays)
    _write(tmp_path, arrays, BASE_CONFIG, HF)
    with pytest.raises(ValueError, match=match):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("key,value", [("l.weight_scale_2", np.nan), ("l.weight_scale_2", 0.0),
                                       ("l.input_scale", -1.0), ("l.input_scale", np.inf)])
def test_scale_value_errors(rng, tmp_path, key, value):
    arrays = _one(rng)
    arrays[key] = np.array(value, F32)
    _write(tmp_path, arrays, BASE_CONFIG, HF)
    ck = checkpoint.load(tmp_path)   # values are checked on access
    with pytest.raises(ValueError, match=rf"'{key}' \(in model.safetensors\): a global scale must be finite and > 0"):
        ck.linears["l"]


def test_compressed_tensors_errors(rng, tmp_path):
    linears = {"l": LinearWeights(jaxfp4.quantize(random_matrix(rng, (24, 48)), sf_layout="linear"),
                                  jnp.float32(0.01))}
    arrays = ct_arrays(linears, {})
    arrays.pop("l.weight_global_scale")
    _write(tmp_path / "a", arrays, CT_CONFIG)
    with pytest.raises(ValueError, match=r"'l.weight_global_scale' is missing: a compressed-tensors NVFP4 linear "
                                         r"needs l.weight_packed, l.weight_scale and l.weight_global_scale"):
        checkpoint.load(tmp_path / "a")
    arrays = ct_arrays(linears, {})
    arrays["l.weight_global_scale"] = np.full(1, -2.0, F32)
    _write(tmp_path / "b", arrays, CT_CONFIG)
    with pytest.raises(ValueError, match=r"'l.weight_global_scale' .*must be finite and > 0, got -2.0"):
        checkpoint.load(tmp_path / "b").linears["l"]
    arrays["l.weight_global_scale"] = np.full(1, 1e-39, F32)   # subnormal: 1/x overflows
    _write(tmp_path / "c", arrays, CT_CONFIG)
    with pytest.raises(ValueError, match=r"'l.weight_global_scale' .*overflows float32"):
        checkpoint.load(tmp_path / "c").linears["l"]
    arrays["l.weight_global_scale"] = np.full(1, 100.0, F32)
    arrays["l.weight_shape"] = np.array([24, 40], np.int64)
    _write(tmp_path / "d", arrays, CT_CONFIG)
    with pytest.raises(ValueError, match=r"'l.weight_shape' .*\[24, 40\] disagrees with the codes"):
        checkpoint.load(tmp_path / "d").linears["l"]


def _qc(**kw):
    return {**BASE_CONFIG, "quantization_config": kw}


@pytest.mark.parametrize("config,hf,match", [
    (BASE_CONFIG, None, r"no NVFP4 quantization config: expected hf_quant_config.json"),
    (BASE_CONFIG, {"quantization": {"quant_algo": "FP8"}},
     r"hf_quant_config.json: quantization.quant_algo must be 'NVFP4', got 'FP8'"),
    (_qc(quant_method="awq"), None, r"config.json: quantization_config.quant_method must be 'modelopt' or "
                                     r"'compressed-tensors', got 'awq'"),
    (_qc(quant_method="modelopt", quant_algo="W4A8_AWQ"), None,
     r"config.json: quantization_config.quant_algo must be 'NVFP4'"),
    (_qc(quant_method="compressed-tensors", format="float-quantized"), None,
     r"config.json: quantization_config.format must be 'nvfp4-pack-quantized', got \['float-quantized'\]"),
])
def test_format_errors(rng, tmp_path, config, hf, match):
    _write(tmp_path, _one(rng), config, hf)
    with pytest.raises(ValueError, match=match):
        checkpoint.load(tmp_path)


def test_file_errors(rng, tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "hf_quant_config.json").write_text(json.dumps(HF))
    with pytest.raises(ValueError, match=r"no \*.safetensors files"):
        checkpoint.load(tmp_path / "a")
    _write(tmp_path / "b", _one(rng), BASE_CONFIG, HF, shards=2)
    index = json.loads((tmp_path / "b" / checkpoint.INDEX_FILE).read_text())
    index["weight_map"]["l.weight"] = "model-00002-of-00002.safetensors" if (
        index["weight_map"]["l.weight"].startswith("model-00001")) else "model-00001-of-00002.safetensors"
    (tmp_path / "b" / checkpoint.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map puts 'l.weight' in model-0000.-of-00002.safetensors, "
                                         r"which does not hold it"):
        checkpoint.load(tmp_path / "b")
    _write(tmp_path / "c", _one(rng), BASE_CONFIG, HF)
    save_file({"norm": np.ones(2, np.float32)}, tmp_path / "c" / "extra.safetensors")
    with pytest.raises(ValueError, match=r"'norm' is stored twice: in extra.safetensors and model.safetensors"):
        checkpoint.load(tmp_path / "c")
