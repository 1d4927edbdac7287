"""examples/decode.py on the CPU with the tiny config: the benchmark's table and
accuracy, the KV-cache decode against a full causal forward, fused projections
(qkv_proj, gate_up_proj) against separate ones, W4A4 with calibrated static
input scales (the default) and dynamic ones (--dynamic-act-scale), and
--checkpoint with ModelOpt checkpoints written by jaxfp4.checkpoint.save, whose
fused parts have equal global scales and input scales (fused exactly, static
scales from the checkpoint) or not (unfused, calibrated scales)."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxfp4
from jaxfp4.primitives.quantize import quantize_p

pytest.importorskip("flax")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "tiny", "--batches", "1,2", "--tokens", "4", "--prompt-len", "4"]


def _load_example():
    spec = importlib.util.spec_from_file_location("decode_example", ROOT / "examples" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


decode = _load_example()


def _cpu():
    return jax.default_device(jax.devices("cpu")[0])


def test_main_prints_the_table_and_accuracy(tmp_path, capsys):
    plot = tmp_path / "decode.png"
    with _cpu():
        rows = decode.main([*ARGS, "--plot", str(plot)])
    out = capsys.readouterr().out
    assert {(r.model, r.batch) for r in rows} == {(m, b) for m in decode.MODELS for b in (1, 2)}
    for r in rows:
        assert r.tokens_per_s > 0 and r.ms_per_token > 0
        assert f"{r.model:<13} {r.batch:>5}" in out  # the row is printed
        if r.model == "bf16":
            assert r.cosine is None and r.speedup == pytest.approx(1.0)
        else:
            assert r.cosine > 0.9, r
            assert 0.0 <= r.top1 <= 1.0 and r.speedup > 0
    assert "logit cos" in out and "kernels run" in out and "projections: fused qkv_proj, gate_up_proj" in out
    # Calibrated on the 1 + 2 batch rows and 4 extra sequences, max_len = 4 + 4 + 1 tokens each.
    assert "activation scales: static (calibrated on 63 tokens)" in out
    if importlib.util.find_spec("matplotlib"):
        assert plot.stat().st_size > 0


@pytest.mark.parametrize("linear,fused", [("bf16", False), ("w4a16", True)])
def test_kv_cache_decode_matches_full_forward(linear, fused):
    cfg, batch, length = decode.CONFIGS["tiny"], 2, 12
    with _cpu():
        params = decode.random_params(cfg, seed=1, fused=fused)
        if linear != "bf16":
            params = decode.nvfp4_params(params, linear, None)
        model = decode.Decoder(cfg, linear, fused=fused)
        tokens = jax.random.randint(jax.random.key(2), (batch, length), 0, cfg.vocab, jnp.int32)
        # Every step teacher-forced: the cache holds exactly the given tokens.
        run = decode.make_generate(model)
        n = length - 1
        _, _, logits = run(params, *decode.buffers(cfg, batch, length, tokens),
                           jnp.int32(length), jnp.int32(0), jnp.int32(n))
        full, cache = model.apply({"params": params}, tokens[:, :n], jnp.arange(n))
    assert cache is None
    cached = np.asarray(logits[:n].astype(jnp.float32)).transpose(1, 0, 2)
    full = np.asarray(full, np.float32)
    scale = np.abs(full).max()
    np.testing.assert_allclose(cached, full, atol=0.03 * scale, rtol=0)
    cos = np.sum(cached * full, -1) / (np.linalg.norm(cached, axis=-1) * np.linalg.norm(full, axis=-1))
    assert cos.min() > 0.999, cos.min()
    assert np.mean(cached.argmax(-1) == full.argmax(-1)) > 0.75  # random logits: near-ties


def _forward(cfg, params, tokens, linear="bf16", **kw):
    """A full causal forward (jitted: one compile beats many eager ones)."""
    logits, _ = jax.jit(decode.Decoder(cfg, linear, **kw).apply)({"params": params}, tokens,
                                                                 jnp.arange(tokens.shape[1]))
    return np.asarray(logits, np.float32)


def test_fused_projections_are_the_same_bf16_model():
    cfg = decode.CONFIGS["tiny"]
    with _cpu():
        sep = decode.random_params(cfg, seed=4, fused=False)
        fused = decode.random_params(cfg, seed=4)  # the same draws, then fuse_params
        attn, mlp = fused["layers_1"]["self_attn"], fused["layers_1"]["mlp"]
        assert set(attn) == {"qkv_proj", "o_proj"} and set(mlp) == {"gate_up_proj", "down_proj"}
        want = [sep["layers_1"]["self_attn"][p]["kernel"] for p in ("q_proj", "k_proj", "v_proj")]
        assert attn["qkv_proj"]["kernel"].shape == (cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim)
        np.testing.assert_array_equal(attn["qkv_proj"]["kernel"], np.concatenate(want, 1))
        tokens = jax.random.randint(jax.random.key(5), (2, 6), 0, cfg.vocab, jnp.int32)
        a, b = _forward(cfg, sep, tokens, fused=False), _forward(cfg, fused, tokens)
    np.testing.assert_allclose(b, a, atol=0.01 * np.abs(a).max(), rtol=0)  # bf16 rounding at most
    assert decode.parse_args(["--no-fuse"]).fuse is False and decode.parse_args([]).fuse is True


def _quantizes(jaxpr):
    """The quantize_p equations of a jaxpr, its sub-jaxprs' included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is quantize_p:
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if hasattr(inner := getattr(sub, "jaxpr", sub), "eqns"):
                    yield from _quantizes(inner)


def _cosine(a, b):
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def test_calibrated_static_input_scales():
    cfg = decode.CONFIGS["tiny"]
    with _cpu():
        params = decode.random_params(cfg, seed=7)
        tokens = jax.random.randint(jax.random.key(8), (3, 8), 0, cfg.vocab, jnp.int32)
        scales = decode.calibrate(cfg, params, tokens)
        projs = {p[:-1] for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"}
        assert set(scales) == projs and len(projs) == 4 * cfg.layers
        for path, g in scales.items():
            assert g.shape == () and g.dtype == jnp.float32 and np.isfinite(g) and g > 0, (path, g)
        # Layer 0's qkv_proj sees input_layernorm(embed(tokens)): g_a = its amax / (6 * 448).
        x = decode.RMSNorm(cfg.norm_eps).apply({"params": params["layers_0"]["input_layernorm"]},
                                               jnp.take(params["embed_tokens"]["weight"], tokens, axis=0))
        assert float(scales[("layers_0", "self_attn", "qkv_proj")]) == pytest.approx(
            float(jnp.max(jnp.abs(x))) / 2688, rel=1e-6)
        # Unfused, q/k/v (and gate/up) see the fused projection's input: the same scales.
        sep = decode.calibrate(cfg, decode.random_params(cfg, seed=7, fused=False), tokens, fused=False)
        for path, g in sep.items():
            fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(path[-1], path[-1])
            assert float(g) == pytest.approx(float(scales[(*path[:-1], fused)]), rel=0.02), path

        static = decode.nvfp4_params(params, "w4a4", None, input_scales=scales)
        dynamic = decode.nvfp4_params(params, "w4a4", None)
        for path in projs:
            dense = static[path[0]][path[1]][path[2]]
            assert float(dense["input_scale"]) == float(scales[path])
            assert "input_scale" not in dynamic[path[0]][path[1]][path[2]]
        # One decode step: every projection quantizes its input with a static scale
        # (one quantize, no amax pass), or with --dynamic-act-scale a dynamic one.
        cache, tok, pos = decode.init_cache(cfg, 2, 8), tokens[:2, :1], jnp.array([3])
        for p, is_static in ((static, True), (dynamic, False)):
            model = decode.Decoder(cfg, "w4a4", static_input_scale=is_static)
            jaxpr = jax.make_jaxpr(lambda p, c, m=model: m.apply({"params": p}, tok, pos, c))(p, cache)
            eqns = list(_quantizes(jaxpr.jaxpr))
            assert len(eqns) == 4 * cfg.layers
            assert all(e.params["dynamic"] is (not is_static) for e in eqns)
            assert all(len(e.invars) == 1 + is_static for e in eqns)  # x (+ g_a)
        ref = _forward(cfg, params, tokens)
        cos = _cosine(_forward(cfg, static, tokens, "w4a4", static_input_scale=True), ref)
    assert cos > 0.9, cos


def test_dynamic_act_scale(capsys):
    assert decode.parse_args([]).dynamic_act_scale is False
    with _cpu():
        rows = decode.main([*ARGS, "--batches", "1", "--models", "bf16,nvfp4-w4a4", "--dynamic-act-scale",
                            "--plot", ""])
    out = capsys.readouterr().out
    assert "activation scales: dynamic" in out and "calibrated" not in out
    assert [r.model for r in rows] == ["bf16", "nvfp4-w4a4"] and rows[1].cosine > 0.9, rows


@pytest.mark.parametrize("equal_scales", [True, False])
def test_checkpoint_gives_shapes_weights_and_baseline(tmp_path, capsys, equal_scales):
    """equal_scales: every linear quantized with one global scale and given one input
    scale, q/k/v with biases (the model fuses); else each its own dynamic global scale."""
    pytest.importorskip("safetensors")
    from jaxfp4 import checkpoint
    bias = ("q_proj", "k_proj", "v_proj") if equal_scales else ()
    cfg = replace(decode.CONFIGS["tiny"], bias=bias)
    with _cpu():
        flat = traverse_util.flatten_dict(decode.random_params(cfg, seed=3, fused=False))
        flat.update({p: 0.1 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
                     for i, (p, x) in enumerate(flat.items()) if p[-1] == "bias"})
        kernels = {p[:-1]: x for p, x in flat.items() if p[-1] == "kernel"}
        g = max(float(jnp.abs(x).max()) for x in kernels.values()) / (6 * 448) if equal_scales else None
        linears = {decode.hf_name(m): checkpoint.LinearWeights(
            jaxfp4.quantize(x.T, g), jnp.float32(2e-3) if equal_scales else None, flat.get((*m, "bias")))
            for m, x in kernels.items()}
        tensors = {decode.hf_name(p): np.asarray(x) for p, x in flat.items() if p[-1] not in ("kernel", "bias")}
    hf_config = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     intermediate_size=cfg.ffn, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=False, model_type="llama")
    checkpoint.save(tmp_path / "tiny-nvfp4", linears, tensors, config=hf_config)
    assert json.loads((tmp_path / "tiny-nvfp4" / "config.json").read_text())["hidden_size"] == cfg.hidden
    with _cpu():
        rows = decode.main(["--checkpoint", str(tmp_path / "tiny-nvfp4"), "--batches", "1", "--tokens", "3",
                            "--prompt-len", "3", "--plot", ""])
    assert [r.model for r in rows] == list(decode.MODELS)
    # The baseline holds the checkpoint's dequantized weights: only rounding differs.
    assert rows[1].cosine > 0.999, rows[1]
    assert rows[2].cosine > 0.9, rows[2]
    out = capsys.readouterr().out
    assert "tiny-nvfp4" in out
    # Without input scales in the checkpoint: calibrated on the 1 batch row and 4 extra
    # sequences, max_len = 3 + 3 + 1 tokens each.
    assert ("activation scales: static (checkpoint)" if equal_scales else
            "activation scales: static (calibrated on 35 tokens)") in out
    assert ("projections: fused qkv_proj, gate_up_proj" if equal_scales else
            "projections: unfused (the checkpoint's q/k/v or gate/up global scales differ)") in out
    if not equal_scales:
        return
    # Fused exactly: the NVFP4 qkv_proj dequantizes to the fused bf16 kernel, and the
    # W4A4 model (static input scale) gives the unfused model's logits.
    with _cpu():
        args = [decode.parse_args(["--checkpoint", str(tmp_path / "tiny-nvfp4"), *a]) for a in ([], ["--no-fuse"])]
        (cfg, base, ckpt, _, fused), (_, base_sep, _, _, sep) = map(decode.load_weights, args)
        assert fused and not sep and cfg.bias == bias
        (scales, how), (scales_sep, _) = (decode.activation_scales(a, cfg, p, ckpt, f, [])
                                          for a, p, f in zip(args, (base, base_sep), (fused, sep)))
        assert how == "static (checkpoint)" and len(scales) == 4 * cfg.layers and len(scales_sep) == 7 * cfg.layers
        assert all(float(g) == pytest.approx(2e-3) for g in [*scales.values(), *scales_sep.values()])
        q4 = decode.nvfp4_params(base, "w4a4", None, ckpt, scales)["layers_0"]["self_attn"]["qkv_proj"]
        w = jaxfp4.NVFP4Tensor(q4["weight"], q4["weight_scale"], q4["weight_scale_2"], "linear")
        np.testing.assert_array_equal(jaxfp4.dequantize(w, jnp.bfloat16).T,
                                      base["layers_0"]["self_attn"]["qkv_proj"]["kernel"])
        assert float(q4["input_scale"]) == pytest.approx(2e-3)
        tokens = jax.random.randint(jax.random.key(6), (2, 5), 0, cfg.vocab, jnp.int32)
        a = _forward(cfg, decode.nvfp4_params(base_sep, "w4a4", None, ckpt, scales_sep), tokens, "w4a4",
                     static_input_scale=True, fused=False)
        b = _forward(cfg, decode.nvfp4_params(base, "w4a4", None, ckpt, scales), tokens, "w4a4",
                     static_input_scale=True)
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), rtol=0)
