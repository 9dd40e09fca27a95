"""T5Encoder against transformers' T5EncoderModel / UMT5EncoderModel (tiny random, odd sizes), conversion both ways,
loading saved checkpoints, masking and dtype behaviour."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from ttm_jax import config as config_lib
from ttm_jax.models import text_encoder, tokenizer
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import t5

# odd sizes: 3 heads of 12, d_model 20, 8 buckets with max distance 20 so lengths of 12 reach the log buckets
HF_KW = dict(vocab_size=61, d_model=20, d_kv=12, num_heads=3, d_ff=28, num_layers=3, feed_forward_proj="gated-gelu",
             relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
LENGTHS = (12, 7, 1)  # padding in the batch
L = 12


def _torch_model(kind):
    torch.manual_seed({"t5": 0, "umt5": 1}[kind])
    cls, cfg = (T5EncoderModel, T5Config) if kind == "t5" else (UMT5EncoderModel, UMT5Config)
    model = cls(cfg(**HF_KW, attn_implementation="eager")).eval()
    with torch.no_grad():  # norms away from their init of 1, so a misplaced norm scale shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, HF_KW["vocab_size"], size=(len(LENGTHS), L)).astype(np.int32)
    mask = np.arange(L)[None, :] < np.array(LENGTHS)[:, None]
    return np.where(mask, ids, 0).astype(np.int32), mask


@pytest.fixture(scope="module", params=["t5", "umt5"])
def case(request):
    model = _torch_model(request.param)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config = t5.config_from_hf(model.config.to_dict(), config_lib.build(2, "tiny").text_encoder)
    params = t5.from_torch(sd, config)
    return request.param, model, sd, config, params


@pytest.fixture(scope="module")
def apply_fn():
    return jax.jit(lambda config_spec, params, ids, mask, zero: text_encoder.T5Encoder(config_spec).apply(
        {"params": params}, ids, mask, zero_padding=zero), static_argnums=(0, 4))


def test_buckets_match_transformers():
    for nb, md in ((32, 128), (8, 20), (16, 9)):
        got = text_encoder.relative_position_buckets(300, 300, nb, md)
        rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
        want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md)
        np.testing.assert_array_equal(got, want.numpy())


def test_matches_transformers_with_padding(case, apply_fn):
    kind, model, _, config, params = case
    assert config.per_layer_bias == (kind == "umt5")
    ids, mask = _inputs()
    spec = text_encoder.T5Spec.from_config(config)
    got = np.asarray(apply_fn(spec, params, ids, mask, False))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    assert got.shape == (len(LENGTHS), L, HF_KW["d_model"])
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()
    # zero_padding (as Wan's pipeline) keeps real tokens and zeroes the rest
    z = np.asarray(apply_fn(spec, params, ids, mask, True))
    np.testing.assert_array_equal(z[mask], got[mask])
    assert not z[~mask].any()


def test_padding_content_does_not_leak_into_real_tokens(case, apply_fn):
    _, _, _, config, params = case
    ids, mask = _inputs()
    spec = text_encoder.T5Spec.from_config(config)
    other = np.where(mask, ids, 17).astype(np.int32)
    a = np.asarray(apply_fn(spec, params, ids, mask, False))
    b = np.asarray(apply_fn(spec, params, other, mask, False))
    np.testing.assert_allclose(a[mask], b[mask], atol=1e-6)
    assert np.abs(a[~mask] - b[~mask]).max() > 1e-3  # padded rows do see their own (different) input


def test_round_trip_torch_flax_torch_is_bit_identical(case):
    kind, model, sd, config, params = case
    # stacked for scan; the position bias lives once (T5) or per layer (umT5)
    assert params["layers"]["attention"]["q"]["kernel"].shape == (3, 20, 36)
    assert ("relative_bias" in params["layers"]) == (kind == "umt5") != ("relative_bias" in params)
    back = t5.to_torch(params, config, sd)
    assert set(back) == set(sd)  # the tied encoder.embed_tokens.weight included
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and v.tobytes() == sd[k].tobytes(), k
    fresh = type(model)(model.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_loads_sharded_and_bfloat16_checkpoints(case, tmp_path):
    kind, model, sd, config, params = case
    model.save_pretrained(tmp_path / "fp32", max_shard_size="20KB")
    assert (tmp_path / "fp32" / "model.safetensors.index.json").exists()
    loaded = t5.load_params(config, str(tmp_path / "fp32"))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    model.save_pretrained(tmp_path / "pipeline" / "text_encoder")  # a diffusers pipeline folder, single file
    jax.tree.map(np.testing.assert_array_equal, t5.load_params(config, str(tmp_path / "pipeline")), params)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.float()
    loaded = t5.load_params(config, str(tmp_path / "bf16"))
    want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, want)
    assert loaded["final_norm"]["scale"].dtype == np.float32
    bad = config.copy_and_resolve_references()
    bad.num_heads = 4
    with pytest.raises(ValueError, match=r"config.text_encoder.num_heads=4 but .*config.json has 3"):
        t5.load_params(bad, str(tmp_path / "fp32"))
    with pytest.raises(FileNotFoundError, match=r"config.text_encoder.path: .*nothing/config.json does not exist"):
        t5.load_params(config, str(tmp_path / "nothing"))
    assert t5.is_transformers_checkpoint(str(tmp_path / "pipeline")) and not t5.is_transformers_checkpoint(
        str(tmp_path / "nothing"))
    via_config = config.copy_and_resolve_references()
    via_config.path = str(tmp_path / "fp32")
    jax.tree.map(np.testing.assert_array_equal, t5.load_or_init(via_config, seed=0), params)


def test_wrong_rulebook_is_refused_by_name(case):
    kind, _, sd, config, _ = case
    wrong = t5.rulebook(per_layer_bias=kind != "umt5")
    template = t5.param_template(config)
    if kind == "umt5":  # umT5 weights into a T5 rulebook: the extra layers' biases are unmapped
        with pytest.raises(rb.ConversionError, match=r"encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention"):
            wrong.to_flax(sd, template)
    else:  # T5 weights for umT5's per-layer biases: layer 1's is missing
        with pytest.raises(rb.ConversionError, match=r"unmapped flax param 'relative_bias/embedding'"):
            wrong.to_flax(sd, template)


def test_tiny_config_encoder_with_byte_tokenizer():
    config = config_lib.build(2, "tiny").text_encoder
    params = t5.load_or_init(config, seed=3)  # path is empty: random
    config.path = "/nonexistent/orbax"
    with pytest.raises(ValueError, match=r"config.text_encoder.path: /nonexistent/orbax has no config.json"):
        t5.load_or_init(config, seed=3)
    assert params["embedding"]["embedding"].shape == (config.vocab_size, config.d_model)
    assert params["layers"]["ffn"]["wi_0"]["kernel"].shape == (config.num_layers, config.d_model, config.d_ff)
    ids, mask = tokenizer.make_tokenizer(config).encode(["a dog runs left", ""], config.max_length)
    out = jax.jit(text_encoder.T5Encoder(config).apply)({"params": params}, ids, mask)
    assert out.shape == (2, config.max_length, config.d_model) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    # the encoder reads the text: different captions, different embeddings at the first token
    assert np.abs(np.asarray(out[0, 0] - out[1, 0])).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(case, apply_fn):
    _, _, _, config, params = case
    ids, mask = _inputs()
    cfg16 = config.copy_and_resolve_references()
    cfg16.dtype = "bfloat16"
    enc16 = text_encoder.T5Encoder(cfg16)
    shapes = jax.eval_shape(enc16.init, jax.random.key(0), ids, mask)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    out16 = jax.jit(enc16.apply)({"params": params}, ids, mask)
    out32 = apply_fn(text_encoder.T5Spec.from_config(config), params, ids, mask, False)
    assert out16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max()
    assert 0 < err < 0.1 * np.abs(np.asarray(out32)).max(), err


def test_params_carry_logical_axis_names_for_sharding():
    config = config_lib.build(2, "tiny").text_encoder
    config.per_layer_bias = True
    boxed = jax.eval_shape(text_encoder.T5Encoder(config).init, jax.random.key(0),
                           jax.ShapeDtypeStruct((1, 8), jnp.int32), jax.ShapeDtypeStruct((1, 8), jnp.bool_))["params"]
    names = _names(boxed)
    assert names["embedding/embedding"] == ("vocab", "text_embed")
    assert names["layers/attention/q/kernel"] == ("layers", "text_embed", "heads")
    assert names["layers/attention/o/kernel"] == ("layers", "heads", "text_embed")
    assert names["layers/ffn/wo/kernel"] == ("layers", "mlp", "text_embed")
    assert names["layers/relative_bias/embedding"] == ("layers", None, None)
    assert names["final_norm/scale"] == ("text_embed",)


def _names(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_names(v, path) if isinstance(v, dict) else {path: tuple(v.names)})
    return out
