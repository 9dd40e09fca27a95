"""The pipeline's guidance wiring (`inference/pipeline.py: StageRunner`) on a tiny REAL stage-2 model.

`test_guidance.py` pins the two-scale formula on its own; this pins what the pipeline feeds it:

- the conditions of each branch, rebuilt here from the batch with the autoencoder, tokenizer and text encoder:
  `none` = zero first-frame / trajectory latents and the empty prompt (caption and every local-prompt slot),
  `image` = the real latents and the empty prompt, `full` = the real latents and the real prompts; object ids in all;
- one guided Euler step of `StageRunner.sample` equals the step made from three separate model calls on those
  conditions, combined as `v_none + s_img (v_img - v_none) + s_txt (v_full - v_img)` with the configured
  `image_scale != text_scale` (so scales passed as `[text, image]`, or `none` and `image` swapped, fail).

The stage is built as `bench/sample.py` builds one (assembly modules, params, frozen text encoder; no training), with
every zero-initialised parameter given random values so that each condition moves the prediction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax.assembly import frozen as frozen_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import params as params_lib
from ttm_jax.assembly import trained as trained_lib
from ttm_jax.inference import pipeline
from ttm_jax.models import masks
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib

O0 = {"xla_backend_optimization_level": 0}
SETTINGS = pipeline.Settings(num_steps=1, schedule="uniform", image_scale=1.7, text_scale=4.0)
SEEDS = [3, 4]


def _randomize_zero_leaves(params, seed=0):
    """Every all-zero leaf (the added layers' output projections, proj_out, biases) -> random normal * 0.3."""
    rng = np.random.default_rng(seed)

    def one(v):
        if np.any(np.asarray(v)):
            return v
        return jax.device_put(np.asarray(0.3 * rng.standard_normal(v.shape), v.dtype), v.sharding)

    return jax.tree.map(one, params)


@pytest.fixture(scope="module")
def stage():
    config = fx.tiny_config(2)
    config.mesh.shape.update(data=1, fsdp=-1, tensor=1)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding_lib.rules_from_config(config.mesh)
    modules = fx.make_modules(config, real_model=True)
    init = params_lib.make_init_params(config, modules)
    params, _ = sharding_lib.init_sharded(init, jax.random.PRNGKey(0), mesh=mesh, rules=rules, compiler_options=O0)
    frozen, _ = frozen_lib.init_frozen(config, modules, mesh, rules)
    return trained_lib.Stage(config, modules, _randomize_zero_leaves(params), frozen, mesh, rules, 0, "<random>")


@pytest.fixture(scope="module")
def batch(stage):
    rows = [fx.synthetic_example(i, stage.config) for i in (1, 2)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "example_id"}


@pytest.fixture(scope="module")
def runner(stage):
    """The pipeline's runner of the stage (batched guidance, as `Pipeline` builds it); shared, so it compiles once."""
    return pipeline.StageRunner(stage)


@pytest.fixture(scope="module")
def expected(stage, batch):
    """The three branches' conditions, built here from the batch (not through `inputs.prepare`)."""
    config, modules = stage.config, stage.modules
    t = config.text_encoder
    b = batch["video"].shape[0]
    e_ids, e_mask = modules.tokenizer.encode([""] * b, int(t.max_length))
    s, lp = batch["local_tokens"].shape[1:]
    el_ids, el_mask = modules.tokenizer.encode([""] * (b * s), int(t.local_max_length))
    inputs = (stage.frozen["text_encoder"], batch, np.asarray(e_ids), np.asarray(e_mask, bool), np.asarray(el_ids),
              np.asarray(el_mask, bool))
    build = jax.jit(lambda *a: _expected(config, modules, *a))
    return jax.tree.map(np.asarray, build.lower(*inputs).compile(compiler_options=O0)(*inputs))


def _expected(config, modules, te, batch, e_ids, e_mask, el_ids, el_mask):
    ae = modules.autoencoder
    b = batch["video"].shape[0]
    s, lp = batch["local_tokens"].shape[1:]
    unit = lambda v: v.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
    latent = ae.encode(unit(batch["video"]))
    first, cond = latent[:, :1], ae.encode(unit(batch["trajectory"]))

    def text(ids, mask):
        emb = modules.text_encoder.apply({"params": te}, ids, mask.astype(bool))
        return emb * mask.astype(emb.dtype)[..., None]

    caption = text(batch["caption_tokens"], batch["caption_mask"])
    empty = text(e_ids, e_mask)
    local = text(batch["local_tokens"].reshape(b * s, lp), batch["local_mask"].reshape(b * s, lp)).reshape(b, s * lp,
                                                                                                           -1)
    empty_local = text(el_ids, el_mask).reshape(b, s * lp, -1)
    geo = dict(time_factor=ae.time_factor, space_factor=ae.space_factor, patch_size=tuple(config.model.patch_size))
    om = batch["object_masks"]
    ids = dict(token_ids=masks.token_ids_from_masks(om, **geo), cross_token_ids=masks.token_ids_from_boxes(om, **geo))
    null_text = dict(context=empty, local_context=empty_local,
                     local_ids=masks.local_prompt_ids(el_mask.reshape(b, s, lp)), **ids)
    real_text = dict(context=caption, local_context=local,
                     local_ids=masks.local_prompt_ids(batch["local_mask"]), **ids)
    zeros = dict(first=jnp.zeros_like(first), cond=jnp.zeros_like(cond))
    real = dict(first=first, cond=cond)
    return dict(none={**zeros, **null_text}, image={**real, **null_text}, full={**real, **real_text})


def test_each_branch_gets_its_conditions(runner, batch, expected):
    conds = runner.conditions(batch)._asdict()
    for branch in ("none", "image", "full"):
        got = jax.tree.map(np.asarray, conds[branch])
        assert set(got) == set(expected[branch]), branch
        for key, want in expected[branch].items():
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6, err_msg=f"conds.{branch}[{key!r}]")
    # not vacuous: the null and real conditions differ in every field that is dropped
    e = expected
    assert np.abs(e["image"]["first"]).max() > 0.1 and np.abs(e["image"]["cond"]).max() > 0.1
    assert np.abs(e["full"]["context"] - e["image"]["context"]).max() > 1e-2
    assert np.abs(e["full"]["local_context"] - e["image"]["local_context"]).max() > 1e-2
    assert (e["full"]["local_ids"] != e["image"]["local_ids"]).any()
    assert (e["full"]["token_ids"] > 0).any()


def test_guided_step_is_the_two_scale_combination_of_three_model_calls(stage, runner, batch, expected):
    out = np.asarray(runner.sample(runner.conditions(batch), SEEDS, SETTINGS))

    noise = np.asarray(runner.noise(SEEDS))
    ts = runner.time_grid(SETTINGS)
    assert ts.shape == (2,)
    t = jnp.full((noise.shape[0],), ts[0], jnp.float32)
    model = inputs_lib.model_fn(stage.config, stage.modules)
    call = jax.jit(model).lower(noise, t, stage.params, expected["full"]).compile(compiler_options=O0)
    v0, vi, vf = (np.asarray(call(noise, t, stage.params, expected[k]), np.float64) for k in ("none", "image", "full"))
    s_img, s_txt = SETTINGS.image_scale, SETTINGS.text_scale
    assert s_img != s_txt

    def step(v):
        return noise + (float(ts[1]) - float(ts[0])) * v

    want = step(v0 + s_img * (vi - v0) + s_txt * (vf - vi))
    scale = float(np.abs(want - noise).max())
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-4 * scale)
    # not vacuous: each condition moves the prediction, and the miswirings land far from the wanted step
    assert min(np.abs(vi - v0).max(), np.abs(vf - vi).max()) > 1e-2 * scale
    miswired = {"scales [text, image]": step(v0 + s_txt * (vi - v0) + s_img * (vf - vi)),
                "none <-> image": step(vi + s_img * (v0 - vi) + s_txt * (vf - v0)),
                "unguided": step(vf)}
    for name, wrong in miswired.items():
        assert np.abs(wrong - want).max() > 1e-2 * scale, name
