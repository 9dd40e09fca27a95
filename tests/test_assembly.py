"""The stage-assembly layer's seams: a backbone and an objective plug in as registry entries, and training,
checkpointing, loading and guided sampling run them with no change to `train/` or `inference/`.

The entries registered here are small but real: a per-token MLP backbone (`ToyBackbone`) and an x0-prediction
objective (`X0Prediction`: the model predicts the clean latent; sampling steps along the velocity it implies).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives, registry, trained
from ttm_jax.assembly.modules import build_modules
from ttm_jax.diffusion import flow, samplers
from ttm_jax.inference import pipeline as pipeline_lib
from ttm_jax.train import loop


class ToyBackbone(nn.Module):
    """`(x [B,T',H',W',Cin], timestep [B], context [B,L,d], **kwargs) -> [B,T',H',W',Cout]`: a per-token MLP whose
    hidden units are shifted by the timestep and the mean caption embedding."""

    in_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x, timestep, context, **kwargs):
        del kwargs  # no added masked layers
        h = nn.Dense(32, name="proj_in")(x)
        cond = nn.Dense(32, name="time")(timestep[:, None] / 1000.0) + nn.Dense(32, name="text")(context.mean(1))
        h = nn.gelu(h + cond[:, None, None, None, :])
        return nn.Dense(self.out_channels, name="proj_out")(h)


def _toy_inputs(config, *, batch=1, full=False, abstract=False):
    grid = config_lib.latent_shape(config)[:3] if full else (1, 1, 1)
    make = (lambda s, d: jax.ShapeDtypeStruct(s, d)) if abstract else jnp.zeros
    x = make((batch, *grid, config_lib.in_channels(config)), jnp.float32)
    t = make((batch,), jnp.float32)
    ctx = make((batch, int(config.text_encoder.max_length), int(config.model.text_dim)), jnp.float32)
    return (x, t, ctx), {}


class X0Prediction(objectives.RectifiedFlow):
    """Same path and times as rectified flow; the model predicts x0, and sampling uses `v = (x_t - x0_hat) / t`."""

    name = "x0_prediction"

    def target(self, x0, eps, t):
        del eps, t
        return x0

    def sample(self, model_fn, noise, ts, *args):
        def velocity(x, t, *a):
            x0_hat = model_fn(x, t, *a)
            return (x - x0_hat) / jnp.maximum(t, 1e-3).reshape((-1,) + (1,) * (x.ndim - 1))

        return samplers.euler_sample(velocity, noise, ts, *args)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The toy entries exist while this module's tests run, and are removed after (the registries are global)."""
    registry.BACKBONES.register("toy", registry.Backbone(
        build=lambda c: ToyBackbone(config_lib.in_channels(c), c.autoencoder.latent_channels),
        init_inputs=_toy_inputs))
    objectives.OBJECTIVES.register("x0_prediction", X0Prediction)
    yield
    registry.BACKBONES.unregister("toy")
    objectives.OBJECTIVES.unregister("x0_prediction")


def _toy_config(steps: int = 2):
    c = fx.tiny_config(1, **{"train.total_steps": steps, "train.checkpoint_every_steps": 1})
    c.model.backbone = "toy"
    c.objective.name = "x0_prediction"
    return c


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("toy"))
    res = loop.train(_toy_config(), wd, make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    return wd, res


def test_registered_backbone_and_objective_train(toy_run):
    wd, res = toy_run
    assert res.final_step == 2 and all(np.isfinite(m["loss"]) for _, m in res.history)
    # the trained params are the toy backbone's, not the DiT's
    assert set(res.state.params) == {"proj_in", "time", "text", "proj_out"}
    assert res.state.params["proj_out"]["kernel"].shape == (32, config_lib.latent_shape(_toy_config())[-1])


def test_objective_sets_the_loss_target():
    """`model_inputs` regresses what the objective says: the clean latent for x0-prediction, `eps - x0` for flow."""
    c = _toy_config()
    mods = build_modules(c)
    batch = {k: jnp.asarray(v) for k, v in next(iter(fx.make_dataset(c))).items() if k in inputs_lib.BATCH_KEYS}
    te = mods.text_encoder.init(jax.random.PRNGKey(0), batch["motion_tokens"], batch["motion_mask"])["params"]
    frozen = {"text_encoder": te, "empty_context": jnp.zeros((1, c.text_encoder.max_length, c.model.text_dim))}
    b = batch["video"].shape[0]
    rand = inputs_lib.draw(jax.random.PRNGKey(1), b, config_lib.latent_shape(c), c.objective)
    rand["drop_image"] = rand["drop_text"] = jnp.zeros((b,), bool)
    x0 = mods.autoencoder.encode(batch["trajectory"].astype(jnp.float32) / 127.5 - 1.0)
    _, _, target = inputs_lib.model_inputs(c, mods, frozen, batch, rand)
    np.testing.assert_allclose(target, x0, atol=1e-6)
    c.objective.name = "rectified_flow"
    _, kw, target = inputs_lib.model_inputs(c, mods, frozen, batch, rand)
    np.testing.assert_allclose(target, flow.velocity_target(x0, rand["eps"]), atol=1e-6)
    np.testing.assert_allclose(kw["timestep"], 1000.0 * rand["t"], rtol=1e-6)


def test_indexed_condition_frames_reach_the_dit_through_the_stage_input():
    """`model.condition_frames=indexed` on the real DiT: the training input's last channel is the frame's place (also
    for examples whose image is dropped), and the patch embedding reads `config.in_channels` channels."""
    c = fx.tiny_config(1, **{"model.condition_frames": "indexed"})
    mods = fx.make_modules(c, real_model=True)
    batch = {k: jnp.asarray(v) for k, v in next(iter(fx.make_dataset(c))).items() if k in inputs_lib.BATCH_KEYS}
    te = mods.text_encoder.init(jax.random.PRNGKey(0), batch["motion_tokens"], batch["motion_mask"])["params"]
    frozen = {"text_encoder": te, "empty_context": jnp.zeros((1, c.text_encoder.max_length, c.model.text_dim))}
    b = batch["video"].shape[0]
    rand = inputs_lib.draw(jax.random.PRNGKey(1), b, config_lib.latent_shape(c), c.objective)
    rand["drop_image"] = jnp.arange(b) % 2 == 0
    x, kw, target = inputs_lib.model_inputs(c, mods, frozen, batch, rand)
    frames = target.shape[1]
    assert x.shape[-1] == config_lib.in_channels(c) == 3 * target.shape[-1] + 1
    np.testing.assert_allclose(x[..., -1], np.broadcast_to(
        (np.arange(frames) / (frames - 1))[None, :, None, None], x.shape[:-1]), atol=1e-7)
    # shapes only (eval_shape): the patch embedding reads every input channel and the output is the latent's
    shapes = jax.eval_shape(lambda: nn.unbox(mods.model.init(jax.random.PRNGKey(2), x, **kw)["params"]))
    assert shapes["patch_embedding"]["kernel"].shape[-2] == x.shape[-1]
    out = jax.eval_shape(lambda p: mods.model.apply({"params": p}, x, **kw), shapes)
    assert out.shape == target.shape


def test_trained_stage_loads_and_samples_through_the_registry(toy_run):
    wd, res = toy_run
    stage = trained.load_stage(wd, 1)
    assert isinstance(stage.modules.model, ToyBackbone) and stage.step == 2
    jax.tree.map(np.testing.assert_array_equal, stage.params, res.state.params)
    runner = pipeline_lib.StageRunner(stage)
    assert isinstance(runner.objective, X0Prediction)
    batch = {k: v[:1] for k, v in next(iter(fx.make_dataset(stage.config))).items() if k in inputs_lib.BATCH_KEYS}
    settings = pipeline_lib.Settings(num_steps=3, schedule="uniform")
    latents = np.asarray(runner.sample(runner.conditions(batch), [0], settings))
    assert latents.shape == (1, *config_lib.latent_shape(stage.config)) and np.isfinite(latents).all()

    # the same Euler loop, written out with the objective's x0 -> velocity rule, gives the same latents
    conds = runner.conditions(batch)
    apply = inputs_lib.model_fn(stage.config, stage.modules)
    x = runner.noise([0])
    ts = samplers.time_grid(3, "uniform")
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        tb = jnp.full((1,), t, jnp.float32)
        guided = pipeline_lib.guidance.guided(lambda x3, t3, c: apply(x3, t3, stage.params, c), x, tb, conds,
                                              settings.image_scale, settings.text_scale)
        x = x + (t_next - t) * (x - guided) / max(float(t), 1e-3)
    np.testing.assert_allclose(latents, np.asarray(x), atol=2e-4)


def test_self_conditioned_stage_trains_and_samples_through_the_pipeline(tmp_path):
    """`model.self_condition` through the registry: the backbone reads one more latent of channels; the train step's
    loss takes the first pass's estimate on the examples whose coin says so (and equals the zero-estimate loss where
    none does); the generation pipeline's DDIM hands each step the previous step's guided clean estimate."""
    from ttm_jax.diffusion import ddim
    from ttm_jax.train import step as step_lib

    c = _toy_config()
    c.objective.name, c.model.self_condition = "ddim_v", True
    c.train.sample_every_steps = 2  # the training loop's own samples run the self-conditioned sampler too
    wd = str(tmp_path / "run")
    res = loop.train(c, wd, make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert res.final_step == 2 and all(np.isfinite(m["loss"]) for _, m in res.history)
    assert sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.mp4"))
    lat = config_lib.latent_shape(c)[-1]
    assert res.state.params["proj_in"]["kernel"].shape[0] == config_lib.in_channels(c) == 4 * lat

    mods = build_modules(c)
    batch = {k: jnp.asarray(v) for k, v in next(iter(fx.make_dataset(c))).items() if k in inputs_lib.BATCH_KEYS}
    te = mods.text_encoder.init(jax.random.PRNGKey(0), batch["motion_tokens"], batch["motion_mask"])["params"]
    frozen = {"text_encoder": te, "empty_context": jnp.zeros((1, c.text_encoder.max_length, c.model.text_dim))}
    b = batch["video"].shape[0]
    rand = inputs_lib.draw(jax.random.PRNGKey(1), b, config_lib.latent_shape(c), c.objective, self_condition=True)
    loss_fn = step_lib.make_loss_fn(c, mods)
    params = res.state.params
    loss = {on: float(loss_fn(params, frozen, batch, {**rand, "self_cond": jnp.full((b,), on)})[0])
            for on in (True, False)}
    x, kw, target = inputs_lib.model_inputs(c, mods, frozen, batch, rand)
    pred = mods.model.apply({"params": params}, x, kw.pop("timestep"), kw.pop("context"), **kw)
    np.testing.assert_allclose(loss[False], float(jnp.mean((pred - target) ** 2)), rtol=1e-5)
    assert abs(loss[True] - loss[False]) > 1e-4

    # training and sampling agree on the layout: the model call given conditions (`model_fn`, what the samplers
    # run) on [noisy, estimate] is the training forward on the input `self_conditioned` built
    no = jnp.zeros((b,), bool)
    rand1 = {**rand, "self_cond": jnp.ones((b,), bool), "drop_image": no, "drop_text": no}
    x, kw, _ = inputs_lib.model_inputs(c, mods, frozen, batch, rand1)
    timestep, context = kw.pop("timestep"), kw.pop("context")
    predict = lambda inp: mods.model.apply({"params": params}, inp, timestep, context, **kw)  # noqa: E731
    x = inputs_lib.self_conditioned(x, predict, objectives.make_objective(c.objective), rand1, lat)
    assert float(jnp.abs(x[..., lat:2 * lat]).max()) > 0  # a real estimate in its slot
    _, first, cond, text = inputs_lib.prepare(c, mods, frozen, batch)
    conds = inputs_lib.conditions(first, cond, inputs_lib.drop_text_conditions(c, mods, frozen, text, no))
    via_fn = inputs_lib.model_fn(c, mods)(x[..., :2 * lat], rand1["t"], params, conds)
    np.testing.assert_allclose(np.asarray(via_fn), np.asarray(predict(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"model\.self_condition=True takes x = \[noisy, previous clean estimate\]"):
        inputs_lib.model_fn(c, mods)(x[..., :lat], rand1["t"], params, conds)

    stage = trained.load_stage(wd, 1)
    runner = pipeline_lib.StageRunner(stage)
    assert runner.self_condition
    one = {k: v[:1] for k, v in batch.items()}
    settings = pipeline_lib.Settings(num_steps=3)
    conds = runner.conditions({k: np.asarray(v) for k, v in one.items()})
    latents = np.asarray(runner.sample(conds, [0], settings))
    apply = inputs_lib.model_fn(stage.config, stage.modules)
    obj = runner.objective
    ts = runner.time_grid(settings)
    a_t, a_prev = ddim.step_alphas(ts, obj.alphas_cumprod, obj.num_train_timesteps)
    x, prev = runner.noise([0]), jnp.zeros((1, *config_lib.latent_shape(c)), jnp.float32)
    for i, t in enumerate(ts):
        tb = jnp.full((1,), t, jnp.float32)
        v = pipeline_lib.guidance.guided(lambda x3, t3, cc: apply(x3, t3, stage.params, cc),
                                         jnp.concatenate([x, prev], -1), tb, conds, settings.image_scale,
                                         settings.text_scale)
        prev = ddim.clean_from_velocity(x, v, jnp.full((1,), a_t[i]))
        x = ddim.ddim_step(x, v, a_t[i], a_prev[i])
    np.testing.assert_allclose(latents, np.asarray(x), atol=2e-4)


def test_self_conditioning_with_an_objective_that_cannot_sample_it_fails_before_training(tmp_path):
    c = _toy_config()
    c.model.self_condition = True  # X0Prediction.sample takes no self_condition
    with pytest.raises(ValueError, match=r"config\.model\.self_condition: the objective 'x0_prediction' samples "
                                         r"without self-conditioning"):
        loop.train(c, str(tmp_path / "run"), make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_names_are_errors_naming_the_field():
    c = _toy_config()
    c.model.backbone = "unet9000"
    with pytest.raises(ValueError, match=r"config\.model\.backbone: 'unet9000' is not registered; choose one of "
                                         r"\[.*'dit'.*'toy'.*\]"):
        build_modules(c)
    c = _toy_config()
    c.objective.name = "ddim"
    with pytest.raises(ValueError, match=r"config\.objective\.name: 'ddim'"):
        objectives.make_objective(c.objective)


