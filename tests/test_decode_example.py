"""examples/decode.py on the CPU with the tiny config: the benchmark's table and
accuracy, the KV-cache decode against a full causal forward, fused projections
(qkv_proj, gate_up_proj) against separate ones, W4A4 with calibrated static
input scales (the default) and dynamic ones (--dynamic-act-scale), the NVFP4
lm_head (--lm-head: W4A16 on the quantized table, tied embeddings too) against
the bf16 one, and --checkpoint with ModelOpt checkpoints written by
jaxfp4.checkpoint.save, whose fused parts have equal global scales and input
scales (fused exactly, static scales from the checkpoint) or not (unfused,
calibrated scales), with the lm_head stored bf16 (auto: bf16) or quantized
(auto: used as stored)."""

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
from jax import lax

import jaxfp4
from jaxfp4.primitives.fused_gemm import fused_gemm_p
from jaxfp4.primitives.gemm_chain import _link_operands, gemm_chain_p
from jaxfp4.primitives.gemm import gemm_p
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
    # Random weights, --lm-head auto: every projection of the NVFP4 models NVFP4, the lm_head too.
    assert ("lm_head: nvfp4 (w4a16, the bf16 lm_head quantized); the W4A4 model's too "
            "(weight-only: no input scale)\n") in out
    # Calibrated on the 1 + 2 batch rows and 4 extra sequences, max_len = 4 + 4 + 1 tokens each.
    assert "activation scales: static (calibrated on 63 tokens)" in out
    if importlib.util.find_spec("matplotlib"):
        assert plot.stat().st_size > 0


@pytest.mark.parametrize("linear,fused,head", [("bf16", False, "bf16"), ("w4a16", True, "bf16"),
                                               ("w4a16", True, "nvfp4")])
def test_kv_cache_decode_matches_full_forward(linear, fused, head):
    cfg, batch, length = decode.CONFIGS["tiny"], 2, 12
    with _cpu():
        params = decode.random_params(cfg, seed=1, fused=fused)
        if linear != "bf16":
            params = decode.nvfp4_params(cfg, params, linear, None, head=head)
        model = decode.Decoder(cfg, linear, fused=fused, head=head)
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


def test_neighbours_fused_into_the_nvfp4_projections():
    """W4A16 decode step: every projection and the lm_head is one fused GEMM taking the
    layer's norm (qkv_proj, gate_up_proj, lm_head), the SwiGLU (gate_up_proj's epilogue:
    its weight rows interleaved) or the residual (o_proj, down_proj); the logits are those
    of the same ops run separately."""
    cfg = decode.CONFIGS["tiny"]
    with _cpu():
        base = decode.random_params(cfg, seed=6)
        params = decode.nvfp4_params(cfg, base, "w4a16", None, head="nvfp4")
        cache, tok, pos = decode.init_cache(cfg, 2, 8), jnp.zeros((2, 1), jnp.int32), jnp.array([3])
        model = decode.Decoder(cfg, "w4a16", head="nvfp4")
        jaxpr = jax.make_jaxpr(lambda p, c: model.apply({"params": p}, tok, pos, c))(params, cache).jaxpr
        fused = [(p["prologue"], p["epilogue"], res) for p, res in _fused_gemms(jaxpr)]
        # qkv_proj's epilogue: RoPE and the KV-cache writes (its heads' halves interleaved)
        layer = [("rms_norm", "rotary_kv_cache", False), ("none", "none", True),
                 ("rms_norm", "swiglu_interleaved", False), ("none", "none", True)]
        assert fused == layer * cfg.layers + [("rms_norm", "none", False)]
        # o_proj, gate_up_proj, down_proj (its residual: o_proj's output) and the next layer's
        # qkv_proj as one chain; the first qkv_proj on its own (a one-link chain: its epilogue
        # has arrays of its own), the last chain without it
        chains = list(_eqns(jaxpr, gemm_chain_p))
        assert len(chains) == cfg.layers + 1
        assert [e.params["res_from"] for e in chains] == [(-1,)] + [(-1, -1, 0, -1)] * (cfg.layers - 1) + [
            (-1, -1, 0)]
        assert [e.params["rotary_heads"] for e in chains] == [(cfg.heads,)] + [(0, 0, 0, cfg.heads)] * (
            cfg.layers - 1) + [(0, 0, 0)]
        assert not list(_eqns(jaxpr, lax.dynamic_update_slice_p))  # the caches: written by the epilogue
        assert not list(_eqns(jaxpr, gemm_p))
        # Op by op the same bits (under jit XLA may keep an unfused residual sum in float32
        # for the norm that reads it: excess precision, about a bf16 ulp per layer).
        tokens = jax.random.randint(jax.random.key(7), (2, 6), 0, cfg.vocab, jnp.int32)
        a, b = (decode.Decoder(cfg, "w4a16", head="nvfp4", fuse_neighbours=f) for f in (True, False))
        with jax.disable_jit():
            a, b = (m.apply({"params": params}, tokens, jnp.arange(6))[0] for m in (a, b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # W4A4 with separate q/k/v and gate/up projections: each takes the norm, down_proj the SwiGLU
        sep = decode.nvfp4_params(cfg, decode.random_params(cfg, seed=6, fused=False), "w4a4", None)
        a, b = (decode.Decoder(cfg, "w4a4", fused=False, fuse_neighbours=f) for f in (True, False))
        with jax.disable_jit():
            a, b = (m.apply({"params": sep}, tokens, jnp.arange(6))[0] for m in (a, b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    args = decode.parse_args(["--no-fuse-neighbours"])
    assert args.fuse_neighbours is False and decode.parse_args([]).fuse_neighbours is True


def _fused_gemms(jaxpr):
    """(params, has a residual) of every fused GEMM in program order: each fused_gemm_p
    op, and each link of a gemm_chain_p op."""
    for e in _eqns(jaxpr, (fused_gemm_p, gemm_chain_p)):
        if e.primitive is fused_gemm_p:
            yield e.params, e.invars[-1].aval.size > 0
            continue
        for i, p in enumerate(e.params["links"]):
            fused, _ = _link_operands(e.invars[1:], e.params["rotary_heads"])[i]
            yield dict(p), fused[5].aval.size > 0 or e.params["res_from"][i] >= 0


def _eqns(jaxpr, primitive=quantize_p):
    """The equations of `primitive` (or of any of a tuple of them) in a jaxpr, its
    sub-jaxprs' included, in program order."""
    prims = primitive if isinstance(primitive, tuple) else (primitive,)
    for eqn in jaxpr.eqns:
        if eqn.primitive in prims:
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if hasattr(inner := getattr(sub, "jaxpr", sub), "eqns"):
                    yield from _eqns(inner, primitive)


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
        x = decode.RMSNorm(cfg.hidden, cfg.norm_eps).apply({"params": params["layers_0"]["input_layernorm"]},
                                               jnp.take(params["embed_tokens"]["weight"], tokens, axis=0))
        assert float(scales[("layers_0", "self_attn", "qkv_proj")]) == pytest.approx(
            float(jnp.max(jnp.abs(x))) / 2688, rel=1e-6)
        # Unfused, q/k/v (and gate/up) see the fused projection's input: the same scales.
        sep = decode.calibrate(cfg, decode.random_params(cfg, seed=7, fused=False), tokens, fused=False)
        for path, g in sep.items():
            fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(path[-1], path[-1])
            assert float(g) == pytest.approx(float(scales[(*path[:-1], fused)]), rel=0.02), path

        static = decode.nvfp4_params(cfg, params, "w4a4", None, input_scales=scales)
        dynamic = decode.nvfp4_params(cfg, params, "w4a4", None)
        for path in projs:
            dense = static[path[0]][path[1]][path[2]]
            assert float(dense["input_scale"]) == float(scales[path])
            assert "input_scale" not in dynamic[path[0]][path[1]][path[2]]
        # One decode step: every projection is one GEMM that quantizes its input
        # with the static scale (matmul's input_scale: no quantize op, no amax
        # pass), or with --dynamic-act-scale a dynamic quantize then the GEMM.
        cache, tok, pos = decode.init_cache(cfg, 2, 8), tokens[:2, :1], jnp.array([3])
        for p, is_static in ((static, True), (dynamic, False)):
            model = decode.Decoder(cfg, "w4a4", static_input_scale=is_static)
            jaxpr = jax.make_jaxpr(lambda p, c, m=model: m.apply({"params": p}, tok, pos, c))(p, cache)
            quantizes = list(_eqns(jaxpr.jaxpr))
            modes = [e.params["mode"] for e in _eqns(jaxpr.jaxpr, gemm_p)]
            if is_static:  # each with its neighbours (norm, SwiGLU, residual): one fused op
                fused = [p["quantize_a"] for p, _ in _fused_gemms(jaxpr.jaxpr)]
                assert not quantizes and not modes and fused == [True] * (4 * cfg.layers)
            else:
                assert len(quantizes) == 4 * cfg.layers and modes == ["w4a4"] * (4 * cfg.layers)
                assert all(e.params["dynamic"] and len(e.invars) == 1 for e in quantizes)
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


def _save_checkpoint(path, cfg, flat, g=None, input_scale=None, lm_head_g=None):
    """A ModelOpt checkpoint at `path` of the unfused bf16 model's params `flat`
    (flattened): every kernel quantized with global scale g (None: dynamic), with
    `input_scale`; the lm_head stored bf16, or with lm_head_g quantized with that g."""
    from jaxfp4 import checkpoint
    with _cpu():
        kernels = {p[:-1]: x for p, x in flat.items() if p[-1] == "kernel"}
        linears = {decode.hf_name(m): checkpoint.LinearWeights(jaxfp4.quantize(x.T, g), input_scale,
                                                               flat.get((*m, "bias")))
                   for m, x in kernels.items()}
        tensors = {decode.hf_name(p): np.asarray(x) for p, x in flat.items() if p[-1] not in ("kernel", "bias")}
        if lm_head_g is not None:
            linears["lm_head"] = jaxfp4.quantize(tensors.pop("lm_head.weight"), lm_head_g)
    hf_config = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     intermediate_size=cfg.ffn, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                     tie_word_embeddings=cfg.tie_embeddings, model_type="llama")
    checkpoint.save(path, linears, tensors, config=hf_config)
    return str(path)


@pytest.mark.parametrize("equal_scales", [True, False])
def test_checkpoint_gives_shapes_weights_and_baseline(tmp_path, capsys, equal_scales):
    """equal_scales: every linear quantized with one global scale and given one input
    scale, q/k/v with biases (the model fuses); else each its own dynamic global scale.
    The lm_head is stored bf16: --lm-head auto keeps it bf16."""
    pytest.importorskip("safetensors")
    bias = ("q_proj", "k_proj", "v_proj") if equal_scales else ()
    cfg = replace(decode.CONFIGS["tiny"], bias=bias)
    with _cpu():
        flat = traverse_util.flatten_dict(decode.random_params(cfg, seed=3, fused=False))
        flat.update({p: 0.1 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
                     for i, (p, x) in enumerate(flat.items()) if p[-1] == "bias"})
        g = max(float(jnp.abs(x).max()) for p, x in flat.items() if p[-1] == "kernel") / (6 * 448)
    _save_checkpoint(tmp_path / "tiny-nvfp4", cfg, flat, *((g, jnp.float32(2e-3)) if equal_scales else ()))
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
    assert "lm_head: bf16\n" in out and "lm_head: nvfp4" not in out
    if not equal_scales:
        return
    # Fused exactly: the NVFP4 qkv_proj dequantizes to the fused bf16 kernel, and the
    # W4A4 model (static input scale) gives the unfused model's logits.
    with _cpu():
        args = [decode.parse_args(["--checkpoint", str(tmp_path / "tiny-nvfp4"), *a]) for a in ([], ["--no-fuse"])]
        (cfg, base, ckpt, _, fused), (_, base_sep, _, _, sep) = map(decode.load_weights, args)
        assert fused and not sep and cfg.bias == bias
        # The lm_head is stored bf16: auto keeps it (the NVFP4 params hold the bf16 table);
        # --lm-head nvfp4 quantizes that table.
        assert decode.lm_head(args[0], cfg, ckpt) == ("bf16", "lm_head: bf16")
        assert decode.nvfp4_params(cfg, base, "w4a16", None, ckpt)["lm_head"]["weight"] is base["lm_head"]["weight"]
        forced = decode.parse_args(["--checkpoint", str(tmp_path / "tiny-nvfp4"), "--lm-head", "nvfp4"])
        assert decode.lm_head(forced, cfg, ckpt)[1].startswith("lm_head: nvfp4 (w4a16, the bf16 lm_head quantized)")
        head = decode.nvfp4_params(cfg, base, "w4a16", None, ckpt, head="nvfp4")["lm_head"]
        np.testing.assert_array_equal(head["weight"], jaxfp4.quantize(base["lm_head"]["weight"]).data)
        (scales, how), (scales_sep, _) = (decode.activation_scales(a, cfg, p, ckpt, f, [])
                                          for a, p, f in zip(args, (base, base_sep), (fused, sep)))
        assert how == "static (checkpoint)" and len(scales) == 4 * cfg.layers and len(scales_sep) == 7 * cfg.layers
        assert all(float(g) == pytest.approx(2e-3) for g in [*scales.values(), *scales_sep.values()])
        q4 = decode.nvfp4_params(cfg, base, "w4a4", None, ckpt, scales)["layers_0"]["self_attn"]["qkv_proj"]
        w = jaxfp4.NVFP4Tensor(q4["weight"], q4["weight_scale"], q4["weight_scale_2"], "linear")
        np.testing.assert_array_equal(jaxfp4.dequantize(w, jnp.bfloat16).T,
                                      base["layers_0"]["self_attn"]["qkv_proj"]["kernel"])
        assert float(q4["input_scale"]) == pytest.approx(2e-3)
        tokens = jax.random.randint(jax.random.key(6), (2, 5), 0, cfg.vocab, jnp.int32)
        a = _forward(cfg, decode.nvfp4_params(cfg, base_sep, "w4a4", None, ckpt, scales_sep), tokens, "w4a4",
                     static_input_scale=True, fused=False)
        b = _forward(cfg, decode.nvfp4_params(cfg, base, "w4a4", None, ckpt, scales), tokens, "w4a4",
                     static_input_scale=True)
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max(), rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_nvfp4_lm_head(tied):
    """head="nvfp4": the lm_head is the bf16 table quantized (tied: a copy, the lookup
    keeps the bf16 table), run as one more W4A16 GEMM with float32 logits, in the
    W4A4 model too; its logits differ from the bf16 head's by that quantization."""
    cfg = replace(decode.CONFIGS["tiny"], tie_embeddings=tied)
    with _cpu():
        params = decode.random_params(cfg, seed=9)
        table = params["embed_tokens" if tied else "lm_head"]["weight"]
        assert ("lm_head" in params) is not tied and table.dtype == jnp.bfloat16
        bf16_head = decode.nvfp4_params(cfg, params, "w4a16", None)  # head="bf16": the table as it is
        nvfp4_head = decode.nvfp4_params(cfg, params, "w4a16", None, head="nvfp4")
        assert ("lm_head" in bf16_head) is not tied
        assert nvfp4_head["embed_tokens"]["weight"] is params["embed_tokens"]["weight"]  # lookup: bf16, shared
        head, want = nvfp4_head["lm_head"], jaxfp4.quantize(table, sf_layout="linear")
        assert set(head) == {"weight", "weight_scale", "weight_scale_2"}  # a jaxfp4.flax.Dense's params
        assert head["weight"].dtype == jnp.uint8 and head["weight"].shape == (cfg.vocab, cfg.hidden // 2)
        np.testing.assert_array_equal(head["weight"], want.data)
        np.testing.assert_array_equal(head["weight_scale"].view(jnp.uint8), want.scales.view(jnp.uint8))
        assert float(head["weight_scale_2"]) == float(want.global_scale)

        # One decode step: the lm_head is one more jaxfp4 GEMM, W4A16 with float32 out (the
        # projections' are bf16), also in the W4A4 model, which quantizes no more activations.
        cache, tok, pos = decode.init_cache(cfg, 2, 8), jnp.zeros((2, 1), jnp.int32), jnp.array([3])
        projs = 4 * cfg.layers  # qkv_proj, o_proj, gate_up_proj, down_proj
        for linear in ("w4a16", "w4a4"):
            for p, h in ((bf16_head, "bf16"), (nvfp4_head, "nvfp4")):
                model = decode.Decoder(cfg, linear, head=h)
                jaxpr = jax.make_jaxpr(lambda p, c, m=model: m.apply({"params": p}, tok, pos, c))(p, cache).jaxpr
                gemms = [e.params for e in _eqns(jaxpr, gemm_p)] + [p for p, _ in _fused_gemms(jaxpr)]  # fused: W4A16
                assert len(gemms) == projs + (h == "nvfp4"), (linear, h)
                out = {np.dtype(jnp.bfloat16): "projection", np.dtype(np.float32): "lm_head"}
                modes = sorted((out[p["out_dtype"]], p.get("mode", "w4a16")) for p in gemms)
                assert modes == [("lm_head", "w4a16")] * (h == "nvfp4") + [("projection", linear)] * projs
                assert len(list(_eqns(jaxpr))) == (projs if linear == "w4a4" else 0)

        tokens = jax.random.randint(jax.random.key(10), (2, 6), 0, cfg.vocab, jnp.int32)
        ref = _forward(cfg, params, tokens)
        a = _forward(cfg, bf16_head, tokens, "w4a16")
        b = _forward(cfg, nvfp4_head, tokens, "w4a16", head="nvfp4")
        # The same logits as a bf16-style lm_head holding the quantized table's exact (float32)
        # values, beside the bf16 lookup table: the NVFP4 head is the quantized table.
        untied = {**bf16_head, "lm_head": {"weight": jaxfp4.dequantize(want)}}
        c = _forward(replace(cfg, tie_embeddings=False), untied, tokens, "w4a16")
    scale = np.abs(ref).max()
    np.testing.assert_allclose(b, c, atol=1e-5 * scale, rtol=0)
    assert np.abs(b - a).max() > 0.01 * scale  # the lm_head's quantization shows
    assert _cosine(a, ref) > 0.98 and _cosine(b, ref) > 0.98, (_cosine(a, ref), _cosine(b, ref))


def test_tied_embeddings_with_nvfp4_lm_head(monkeypatch, capsys):
    monkeypatch.setitem(decode.CONFIGS, "tiny", replace(decode.CONFIGS["tiny"], tie_embeddings=True))
    with _cpu():
        rows = decode.main([*ARGS, "--batches", "1", "--lm-head", "nvfp4", "--plot", ""])
    out = capsys.readouterr().out
    assert ("lm_head: nvfp4 (w4a16, a quantized copy of the tied embedding); the W4A4 model's too "
            "(weight-only: no input scale)\n") in out
    assert [r.model for r in rows] == list(decode.MODELS) and all(r.cosine > 0.9 for r in rows[1:]), rows


def test_checkpoint_with_a_quantized_lm_head(tmp_path, capsys):
    """auto: the NVFP4 models use the checkpoint's quantized lm_head as stored (its bytes,
    not a requantization of the dequantized table), the bf16 baseline its dequantized
    values; --lm-head bf16 gives the NVFP4 models that bf16 table too."""
    pytest.importorskip("safetensors")
    cfg = decode.CONFIGS["tiny"]
    with _cpu():
        flat = traverse_util.flatten_dict(decode.random_params(cfg, seed=11, fused=False))
        # A global scale twice the dynamic one: the dequantized table quantizes to other bytes.
        g = 2 * float(jnp.abs(flat[("lm_head", "weight")]).max()) / (6 * 448)
    path = _save_checkpoint(tmp_path / "tiny-qhead", cfg, flat, lm_head_g=g)
    with _cpu():
        args = decode.parse_args(["--checkpoint", path])
        cfg, base, ckpt, _, _ = decode.load_weights(args)
        stored = ckpt.linears["lm_head"].weight
        assert decode.lm_head(args, cfg, ckpt) == (
            "nvfp4", "lm_head: nvfp4 (w4a16, the checkpoint's, as stored); the W4A4 model's too "
            "(weight-only: no input scale)")
        np.testing.assert_array_equal(base["lm_head"]["weight"], jaxfp4.dequantize(stored, jnp.bfloat16))
        head = decode.nvfp4_params(cfg, base, "w4a16", None, ckpt, head="nvfp4")["lm_head"]
        np.testing.assert_array_equal(head["weight"], stored.data)
        np.testing.assert_array_equal(head["weight_scale"].view(jnp.uint8), stored.scales.view(jnp.uint8))
        assert float(head["weight_scale_2"]) == float(stored.global_scale) == pytest.approx(g)
        requantized = jaxfp4.quantize(base["lm_head"]["weight"], sf_layout="linear")
        assert float(requantized.global_scale) != pytest.approx(g)  # what a requantization would give
        no_head = decode.parse_args(["--checkpoint", path, "--lm-head", "bf16"])
        assert decode.lm_head(no_head, cfg, ckpt) == (
            "bf16", "lm_head: bf16 (the checkpoint's quantized lm_head, dequantized)")
        rows = decode.main(["--checkpoint", path, "--batches", "1", "--tokens", "3", "--prompt-len", "3",
                            "--models", "bf16,nvfp4-w4a16", "--plot", ""])
    assert "lm_head: nvfp4 (w4a16, the checkpoint's, as stored)\n" in capsys.readouterr().out
    # The baseline holds the same weights dequantized (to bf16): only rounding differs.
    assert rows[1].cosine > 0.999, rows[1]
