"""Stage 1 with added layers (`model.ttm_layers > 0` in stage 1): each object's first-frame tokens read its local prompt
through masked cross-attention; object ids come from the first frame's masks only, so nothing of the places stage 1
must generate leaks into its inputs; the added self-attention cannot be masked and the config check says so."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop


def _config(**overrides):
    return fx.tiny_config(1, **{"model.ttm_layers": 1, "model.stage1_later_ids": "background", **overrides})


def test_config_stage1_added_self_attention_is_unmasked():
    c = config_lib.build(1, "mid")
    assert c.model.ttm_layers == 0 and c.model.ttm_masked_self is False  # the paper's stage 1: motion prompt only
    t = config_lib.build(1, "tiny")  # the tiny stage 1: added layers in its first block, local prompts at the starts
    assert (t.model.ttm_layers, t.model.num_layers, t.model.stage1_later_ids, t.model.ttm_masked_self) == (
        1, 6, "start", False)
    c.model.ttm_layers = 1
    config_lib.validate(c)
    c.model.ttm_masked_self = True
    with pytest.raises(config_lib.ConfigError, match="model.ttm_masked_self.*first frame only"):
        config_lib.validate(c)


@pytest.fixture(scope="module")
def prepared():
    c = _config()
    modules = fx.make_modules(c, real_model=True)
    mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    frozen = jax.device_get(frozen_lib.init_frozen(c, modules, mesh, sharding_lib.rules_from_config(c.mesh))[0])
    rows = [fx.synthetic_example(i, c) for i in range(4)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k in inputs_lib.BATCH_KEYS}
    # object 1 fills the top-left token (8 x 8 pixels: space factor 4, patch 2) in every frame, and nothing else
    om = np.zeros_like(batch["object_masks"])
    om[:, :, :8, :8, 0] = True
    batch["object_masks"] = om
    text = inputs_lib.prepare(c, modules, frozen, {k: jnp.asarray(v) for k, v in batch.items()})[3]
    return c, modules, frozen, batch, text


def test_local_prompts_and_first_frame_ids_reach_stage1(prepared):
    c, _, _, batch, text = prepared
    assert {"local_context", "local_ids", "cross_token_ids"} <= set(text)
    s, lp = batch["local_tokens"].shape[1:3]
    assert text["local_context"].shape[:2] == (4, s * lp)
    lt, lh, lw, _ = config_lib.latent_shape(c)
    pt, ph, pw = c.model.patch_size
    ids = np.asarray(text["cross_token_ids"]).reshape(4, lt // pt, lh // ph, lw // pw)
    assert (ids[:, 0, 0, 0] == 1).all()  # the object's first-frame token reads its local prompt (slot 1)
    assert (ids[:, 0].reshape(4, -1)[:, 1:] == 0).all()
    assert (ids[:, 1:] == 0).all()  # later frames: background (slot 0), though the object is there in every frame


def test_no_later_frame_masks_leak_into_stage1(prepared):
    """Stage 1 generates the objects' later places: masks of frames 1+ (the training target's) change nothing."""
    c, modules, frozen, batch, a = prepared
    other = dict(batch)
    rng = np.random.default_rng(0)
    om = batch["object_masks"].copy()
    om[:, 1:] = rng.random(om[:, 1:].shape) < 0.5
    other["object_masks"] = om
    b = inputs_lib.prepare(c, modules, frozen, {k: jnp.asarray(v) for k, v in other.items()})[3]
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.slow  # 17 s (the suite is near its 10 minutes); the inputs it trains on are pinned by the tests above
def test_stage1_with_local_prompts_trains(tmp_path):
    c = _config(**{"train.total_steps": 2})
    res = loop.train(c, str(tmp_path / "run"), modules=fx.make_modules(c, real_model=True),
                     make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert res.final_step == 2 and all(np.isfinite(m["loss"]) for _, m in res.history)
    blocks = res.state.params["ttm_blocks"]
    assert "masked_self_attn" in blocks and "masked_cross_attn" in blocks


def test_start_ids_give_later_frames_the_first_frames_ids_and_still_leak_nothing(prepared):
    """`model.stage1_later_ids="start"`: every latent frame's tokens carry the first frame's ids (each object's
    starting place reads its local prompt in every frame, as s0 sits in every frame); the masks of frames 1+ still
    change nothing."""
    c, modules, frozen, batch, background = prepared
    c = config_lib.validate(fx.tiny_config(1, **{"model.ttm_layers": 1, "model.stage1_later_ids": "start"}))
    rng = np.random.default_rng(1)
    texts = []
    for masks in (batch["object_masks"], np.concatenate([batch["object_masks"][:, :1], rng.random(
            batch["object_masks"][:, 1:].shape) < 0.5], axis=1)):
        texts.append(inputs_lib.prepare(c, modules, frozen, {**{k: jnp.asarray(v) for k, v in batch.items()},
                                                             "object_masks": jnp.asarray(masks)})[3])
    lt, lh, lw, _ = config_lib.latent_shape(c)
    pt, ph, pw = c.model.patch_size
    ids = np.asarray(texts[0]["cross_token_ids"]).reshape(4, lt // pt, lh // ph, lw // pw)
    assert lt // pt > 1 and (ids == ids[:, :1]).all()  # every frame as the first
    first = np.asarray(background["cross_token_ids"]).reshape(ids.shape)[:, 0]
    np.testing.assert_array_equal(ids[:, 0], first)  # the first frame as with background later frames
    for key in texts[0]:
        np.testing.assert_array_equal(np.asarray(texts[0][key]), np.asarray(texts[1][key]), err_msg=key)
    bad = fx.tiny_config(1, **{"model.ttm_layers": 1})
    bad.model.stage1_later_ids = "clip"
    with pytest.raises(config_lib.ConfigError, match="model.stage1_later_ids"):
        config_lib.validate(bad)
