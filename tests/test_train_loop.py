"""The train step's stage wiring (targets, conditions, text, ids, dropout), the loop's outputs (mp4 samples,
TensorBoard, bounded runs), and (slow) the tiny default runs of both stages lowering the loss."""

import os

import av
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.models import masks
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import loop


@pytest.fixture(scope="module")
def setup():
    c = fx.tiny_config(2)
    mods = fx.make_modules(c)
    m = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
    frozen, _ = frozen_lib.init_frozen(c, mods, m, sharding_lib.rules_from_config(c.mesh))
    batch = {k: jnp.asarray(v) for k, v in next(iter(fx.make_dataset(c))).items() if k in inputs_lib.BATCH_KEYS}
    return c, mods, frozen, batch


def _compiled(fn, *args):
    """`fn(*args)` compiled with LLVM -O0 (fast CPU compiles; values as eager)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def _prepare(config, mods, frozen, batch):
    return _compiled(lambda f, b: inputs_lib.prepare(config, mods, f, b), frozen, batch)


def _enc(mods, video_u8):
    return mods.autoencoder.encode(jnp.asarray(video_u8, jnp.float32) / 127.5 - 1.0)


def test_stage_targets_and_conditions(setup):
    c2, mods, frozen, batch = setup
    c1 = fx.tiny_config(1)
    ev, et = _enc(mods, batch["video"]), _enc(mods, batch["trajectory"])
    # stage 1: target E(trajectory); conditions E(x0) (first frame encoded alone), E(s0); text = motion prompt
    target, first, cond, text = _prepare(c1, mods, frozen, batch)
    np.testing.assert_allclose(target, et, atol=1e-6)
    np.testing.assert_allclose(first, _enc(mods, batch["video"][:, :1]), atol=1e-6)
    np.testing.assert_allclose(cond, et[:, :1], atol=1e-6)
    motion = _compiled(lambda te, i, m: inputs_lib.encode_text(mods, te, i, m), frozen["text_encoder"],
                       batch["motion_tokens"], batch["motion_mask"])
    np.testing.assert_allclose(text["context"], motion, atol=1e-6)
    assert set(text) == {"context"}
    # stage 2: target E(video); conditions E(x0), E(trajectory); caption; local prompts and object ids
    target, first, cond, text = _prepare(c2, mods, frozen, batch)
    np.testing.assert_allclose(target, ev, atol=1e-6)
    np.testing.assert_allclose(first, ev[:, :1], atol=1e-6)
    np.testing.assert_allclose(cond, et, atol=1e-6)
    geo = dict(time_factor=4, space_factor=4, patch_size=(1, 2, 2))
    np.testing.assert_array_equal(text["token_ids"], masks.token_ids_from_masks(batch["object_masks"], **geo))
    np.testing.assert_array_equal(text["cross_token_ids"], masks.token_ids_from_boxes(batch["object_masks"], **geo))
    np.testing.assert_array_equal(text["local_ids"], masks.local_prompt_ids(batch["local_mask"]))
    b, s, lp = batch["local_tokens"].shape
    assert text["local_context"].shape == (b, s * lp, c2.text_encoder.d_model)
    # padding positions of the text are zeroed
    assert np.all(np.asarray(text["context"])[~np.asarray(batch["caption_mask"])] == 0)
    c_mask = fx.tiny_config(2, **{"model.cross_ids_from": "mask"})
    _, _, _, text_m = _prepare(c_mask, mods, frozen, batch)
    np.testing.assert_array_equal(text_m["cross_token_ids"], text["token_ids"])


def test_cached_latents_are_used_instead_of_the_autoencoder(setup):
    c, mods, frozen, batch = setup
    cached = dict(batch, video_latent=_enc(mods, batch["video"]) + 1.0,
                  trajectory_latent=_enc(mods, batch["trajectory"]) - 1.0)
    target, first, cond, _ = _prepare(c, mods, frozen, cached)
    np.testing.assert_allclose(target, cached["video_latent"])
    np.testing.assert_allclose(cond, cached["trajectory_latent"])


def test_noise_and_dropout_reach_the_model_inputs(setup):
    c, mods, frozen, batch = setup
    b = batch["video"].shape[0]
    rand = inputs_lib.draw(jax.random.PRNGKey(0), b, config_lib.latent_shape(c), c.objective)
    rand["drop_image"] = jnp.arange(b) % 2 == 0
    rand["drop_text"] = jnp.arange(b) < 2
    x, kw, velocity = _compiled(lambda f, b, r: inputs_lib.model_inputs(c, mods, f, b, r), frozen, batch, rand)
    target, first, cond, text = _prepare(c, mods, frozen, batch)
    lc = target.shape[-1]
    tb = rand["t"][:, None, None, None, None]
    np.testing.assert_allclose(x[..., :lc], (1 - tb) * target + tb * rand["eps"], atol=1e-5)
    np.testing.assert_allclose(velocity, rand["eps"] - target, atol=1e-6)
    np.testing.assert_allclose(kw["timestep"], 1000 * rand["t"], rtol=1e-6)
    # dropped image: both condition latents are zeros; kept: E(x0) in frame 0 and the trajectory
    np.testing.assert_array_equal(x[0, ..., lc:], 0)
    np.testing.assert_allclose(x[1, 0, ..., lc:2 * lc], first[1, 0], atol=1e-6)
    np.testing.assert_allclose(x[1, ..., 2 * lc:], cond[1], atol=1e-6)
    # dropped text: the empty prompt everywhere, the local ids follow the empty prompt's mask
    np.testing.assert_allclose(kw["context"][0], frozen["empty_context"][0], atol=1e-6)
    np.testing.assert_allclose(kw["context"][3], text["context"][3], atol=1e-6)
    s = batch["local_mask"].shape[1]
    empty_ids = masks.local_prompt_ids(jnp.broadcast_to(frozen["empty_local_mask"][:, None], (1, s) +
                                                        frozen["empty_local_mask"].shape[1:]))
    np.testing.assert_array_equal(kw["local_ids"][1], empty_ids[0])
    np.testing.assert_array_equal(kw["local_ids"][2], text["local_ids"][2])


def test_loop_writes_mp4_samples_and_tensorboard_and_stops_at_total_steps(tmp_path, capsys):
    c = fx.tiny_config(1, **{"train.total_steps": 2, "train.sample_every_steps": 2, "train.tensorboard": True})
    c.sample.num_steps = 2
    mods = fx.make_modules(c)
    res = loop.train(c, str(tmp_path), modules=mods, make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert res.final_step == 2 and res.checkpoint_steps == [2]
    out = capsys.readouterr().out
    assert "step 2/2  loss" in out and "steps/s" in out
    paths = sorted((tmp_path / "samples").glob("step_0000002_*.mp4"))
    assert len(paths) == 2
    with av.open(str(paths[0])) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    # [generated | reference] side by side, every frame of the clip
    assert len(frames) == c.data.num_frames and frames[0].shape == (c.data.height, 2 * c.data.width, 3)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"train/loss" in events[0].read_bytes()
    # a finished run says so and does nothing
    again = loop.train(c, str(tmp_path), modules=mods, make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert again.start_step == again.final_step == 2
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_default_lowers_the_loss(stage, tmp_path):
    """The embedded default (synthetic SA-V, real DiT, T5 and pipeline) for 60 steps on CPU."""
    c = config_lib.build(stage, "tiny")
    c.train.update(total_steps=60, log_every_steps=10, sample_every_steps=60)
    c.mesh.distributed = "skip"
    c.data.synthetic_dir = os.path.join(str(tmp_path), "synthetic")
    res = loop.train(c, str(tmp_path / "run"), devices=jax.devices()[:1])  # as a plain one-device CPU run
    losses = [h["loss"] for _, h in res.history]
    factor = losses[0] / losses[-1]
    print(f"stage {stage}: loss {losses[0]:.4f} -> {losses[-1]:.4f} (x{factor:.2f} lower)")
    assert factor > 1.2
    assert list((tmp_path / "run" / "samples").glob("*.mp4"))
