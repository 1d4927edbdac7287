"""examples/decode.py on the CPU with the tiny config: the benchmark's table and
accuracy, the KV-cache decode against a full causal forward, and --checkpoint
with a ModelOpt checkpoint written by jaxfp4.checkpoint.save."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    assert "logit cos" in out and "kernels run" in out
    if importlib.util.find_spec("matplotlib"):
        assert plot.stat().st_size > 0


@pytest.mark.parametrize("linear", ["bf16", "w4a16"])
def test_kv_cache_decode_matches_full_forward(linear):
    cfg, batch, length = decode.CONFIGS["tiny"], 2, 12
    with _cpu():
        params = decode.random_params(cfg, seed=1)
        if linear != "bf16":
            params = decode.nvfp4_params(params, linear, None)
        model = decode.Decoder(cfg, linear)
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


def test_checkpoint_gives_shapes_weights_and_baseline(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from flax import traverse_util

    from jaxfp4 import checkpoint
    cfg = decode.CONFIGS["tiny"]
    with _cpu():
        flat = traverse_util.flatten_dict(decode.random_params(cfg, seed=3))
        linears = {decode.hf_name(p[:-1]): jaxfp4.quantize(x.T) for p, x in flat.items() if p[-1] == "kernel"}
        tensors = {decode.hf_name(p): np.asarray(x) for p, x in flat.items() if p[-1] != "kernel"}
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
    assert "tiny-nvfp4" in capsys.readouterr().out
