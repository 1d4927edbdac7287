"""examples/decode.py on the CPU with the tiny config: the benchmark's table and
accuracy, the KV-cache decode against a full causal forward, fused projections
(qkv_proj, gate_up_proj) against separate ones, and --checkpoint with ModelOpt
checkpoints written by jaxfp4.checkpoint.save, whose fused parts have equal
global scales (fused exactly) or not (unfused)."""

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
                            "--prompt-len", "3", "--models", "bf16,nvfp4-w4a16", "--plot", ""])
    assert [r.model for r in rows] == ["bf16", "nvfp4-w4a16"]
    # The baseline holds the checkpoint's dequantized weights: only rounding differs.
    assert rows[1].cosine > 0.999, rows[1]
    out = capsys.readouterr().out
    assert "tiny-nvfp4" in out
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
        q4 = decode.nvfp4_params(base, "w4a4", None, ckpt)["layers_0"]["self_attn"]["qkv_proj"]
        w = jaxfp4.NVFP4Tensor(q4["weight"], q4["weight_scale"], q4["weight_scale_2"], "linear")
        np.testing.assert_array_equal(jaxfp4.dequantize(w, jnp.bfloat16).T,
                                      base["layers_0"]["self_attn"]["qkv_proj"]["kernel"])
        assert float(q4["input_scale"]) == pytest.approx(2e-3)
        tokens = jax.random.randint(jax.random.key(6), (2, 5), 0, cfg.vocab, jnp.int32)
        a = _forward(cfg, decode.nvfp4_params(base_sep, "w4a4", None, ckpt), tokens, "w4a4",
                     static_input_scale=True, fused=False)
        b = _forward(cfg, decode.nvfp4_params(base, "w4a4", None, ckpt), tokens, "w4a4", static_input_scale=True)
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), rtol=0)
