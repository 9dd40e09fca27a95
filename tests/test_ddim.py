"""The `ddim_v` objective against diffusers' DDIMScheduler (zero terminal SNR, trailing timesteps, v-prediction), and
trained end to end through the stage-assembly layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import train_fixtures as fx
from diffusers import DDIMScheduler

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives, trained
from ttm_jax.diffusion import ddim, guidance
from ttm_jax.inference import pipeline
from ttm_jax.train import loop


def _scheduler(**kw) -> DDIMScheduler:
    args = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction",
                clip_sample=False, set_alpha_to_one=True)
    args.update(kw)
    return DDIMScheduler(**args)


def _objective(**kw) -> objectives.DDIMVPrediction:
    c = config_lib.build(1, "tiny")
    c.objective.name = "ddim_v"
    c.objective.update(kw)
    obj = objectives.make_objective(c.objective)
    assert isinstance(obj, objectives.DDIMVPrediction)
    return obj


@pytest.mark.parametrize("schedule,rescale", [("scaled_linear", True), ("scaled_linear", False), ("linear", True)])
def test_alphas_cumprod_match_diffusers(schedule, rescale):
    ref = _scheduler(beta_schedule=schedule, rescale_betas_zero_snr=rescale).alphas_cumprod.double().numpy()
    got = ddim.alphas_cumprod(schedule=schedule, rescale_zero_terminal_snr=rescale)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-7)  # diffusers computes in float32
    if rescale:
        assert got[-1] == 0.0 and ref[-1] < 1e-10  # zero terminal SNR: the last step is pure noise
        assert got[0] == pytest.approx(ddim.alphas_cumprod(schedule=schedule, rescale_zero_terminal_snr=False)[0])
    else:
        assert got[-1] > 1e-3


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 20, 30, 50])
def test_timesteps_match_diffusers(spacing, num_steps):
    s = _scheduler(timestep_spacing=spacing)
    s.set_timesteps(num_steps)
    np.testing.assert_array_equal(ddim.timesteps(num_steps, 1000, spacing), s.timesteps.numpy())
    np.testing.assert_array_equal(_objective(timestep_spacing=spacing).time_grid(num_steps, "linear_quadratic", 3.0),
                                  s.timesteps.numpy().astype(np.float32))


def test_noise_and_velocity_match_diffusers():
    s, obj = _scheduler(), _objective()
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 257, 998, 999])
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(np.asarray(obj.noisy(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t, jnp.float32))),
                               s.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), atol=2e-6)
    v = np.asarray(obj.target(jnp.asarray(x0), jnp.asarray(eps), jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(v, s.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), atol=2e-6)
    np.testing.assert_allclose(v[3], -x0[3], atol=1e-6)  # at the terminal step v = -x0: a target even at pure noise
    assert obj.model_time(jnp.asarray(t, jnp.float32)).tolist() == t.tolist()


@pytest.mark.parametrize("name", ["ddim_v", "rectified_flow"])
def test_clean_estimate_recovers_x0_from_the_true_target(name):
    # the probes' one-step x0: given the exact target at x_t, each objective must return the x0 that made x_t
    c = config_lib.build(1, "tiny")
    c.objective.name = name
    obj = objectives.make_objective(c.objective)
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((3, 2, 4, 4, 5)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t = jnp.asarray([obj.time_at(v) for v in (0.02, 0.5, 1.0)], jnp.float32)
    xt = obj.noisy(x0, eps, t)
    np.testing.assert_allclose(np.asarray(obj.clean_estimate(xt, obj.target(x0, eps, t), t)), np.asarray(x0),
                               atol=2e-5)
    # level 1 is pure noise: x_t carries nothing of x0
    np.testing.assert_allclose(np.asarray(xt[2]), np.asarray(eps[2]), atol=1e-6)
    if name == "ddim_v":  # diffusers' v -> x0 (DDIMScheduler.step's pred_original_sample)
        s = _scheduler()
        v = obj.target(x0, eps, t)
        a = s.alphas_cumprod[torch.as_tensor(np.asarray(t).astype(np.int64))].numpy()[:, None, None, None, None]
        want = np.sqrt(a) * np.asarray(xt) - np.sqrt(1 - a) * np.asarray(v)
        np.testing.assert_allclose(np.asarray(obj.clean_estimate(xt, v, t)), want, atol=2e-5)


def _toy_model(x, t):
    """A deterministic stand-in for the network: depends on x and t the way a v-predictor may."""
    return 0.6 * x - 0.4 * jnp.tanh(x * (t[:, None, None, None] / 1000.0 + 0.2))


@pytest.mark.parametrize("num_steps", [4, 30])
def test_ddim_sampling_matches_diffusers_step_by_step(num_steps):
    """The whole DDIM loop (trailing, from pure noise at t=999) equals diffusers' `step` loop; 30 steps do not divide
    1000, where diffusers steps to `t - T // N` rather than to the next timestep."""
    s, obj = _scheduler(), _objective()
    s.set_timesteps(num_steps)
    noise = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    x = torch.from_numpy(noise)
    for t in s.timesteps:
        tb = jnp.full((2,), float(t), jnp.float32)
        v = torch.from_numpy(np.array(_toy_model(jnp.asarray(x.numpy()), tb)))
        x = s.step(v, t, x, eta=0.0).prev_sample
    ts = obj.time_grid(num_steps)
    got = jax.jit(lambda n, ts: obj.sample(lambda x, t: _toy_model(x, t), n, ts))(jnp.asarray(noise), jnp.asarray(ts))
    np.testing.assert_allclose(np.asarray(got), x.numpy(), atol=2e-5, rtol=1e-5)


def test_guidance_rescale_matches_the_papers_formula():
    rng = np.random.default_rng(2)
    e0, ei, ef = (rng.standard_normal((3, 2, 4, 4)).astype(np.float32) for _ in range(3))
    plain = np.asarray(guidance.combine(*map(jnp.asarray, (e0, ei, ef)), 1.5, 5.0))
    out = np.asarray(guidance.combine(*map(jnp.asarray, (e0, ei, ef)), 1.5, 5.0, 0.7))
    std = lambda a: a.reshape(a.shape[0], -1).std(axis=1)[:, None, None, None]  # noqa: E731
    np.testing.assert_allclose(out, 0.7 * plain * std(ef) / std(plain) + 0.3 * plain, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, plain, atol=1e-3)
    # 0 is off, exactly, traced or not
    traced = jax.jit(lambda *a: guidance.combine(*a, 1.5, 5.0, jnp.float32(0.0)))(e0, ei, ef)
    np.testing.assert_array_equal(np.asarray(traced), jax.jit(lambda *a: guidance.combine(*a, 1.5, 5.0))(e0, ei, ef))


def test_training_times_shift_toward_high_noise():
    """`objective.shift = 1`: the uniform integer draws of before (same key, same timesteps); `shift = s`: the level
    `u ~ U[0, 1)` (the same key's uniform draws) shifted to `s u / (1 + (s - 1) u)` and floored to a timestep, so the
    band above level 0.95 gets `1 - 0.95 / (s - 0.95 (s - 1))` of training (17% at s = 4, against 5% uniform)."""
    key = jax.random.PRNGKey(3)
    plain = np.asarray(_objective(shift=1.0).sample_time(key, 20_000))
    np.testing.assert_array_equal(plain, np.asarray(jax.random.randint(key, (20_000,), 0, 1000), np.float32))
    shifted = np.asarray(_objective(shift=4.0).sample_time(key, 20_000))
    u = np.asarray(jax.random.uniform(key, (20_000,), jnp.float32), np.float64)
    want = np.clip(np.floor(4 * u / (1 + 3 * u) * 1000), 0, 999)
    assert np.mean(shifted == want) > 0.999  # float32 rounding may move a level across a timestep boundary
    assert shifted.min() >= 0 and shifted.max() <= 999 and (shifted == np.floor(shifted)).all()
    high = float(np.mean(shifted >= 950))
    assert high == pytest.approx(1 - 0.95 / (4 - 0.95 * 3), abs=0.01) and float(np.mean(plain >= 950)) < 0.06


def test_config_errors_name_the_field():
    c = config_lib.build(1, "tiny")
    c.objective.name = "ddpm"
    with pytest.raises(ValueError, match=r"objective.name.*'ddpm'.*ddim_v"):
        objectives.make_objective(c.objective)
    c.objective.name = "ddim_v"
    c.objective.beta_end = 0.0001
    with pytest.raises(config_lib.ConfigError, match=r"objective.beta_start: .*beta_start < beta_end"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match=r"num_steps=1001 must be an int in \[1, 1000\]"):
        ddim.timesteps(1001)


@pytest.mark.slow  # ~95 s; the ddim_v stage path trains in the suite through tests/test_unet_stage.py (tiny_unet)
def test_a_stage_trains_and_samples_with_ddim_v(tmp_path):
    """The objective plugs in by name: a tiny stage 1 trains with it (loss finite, checkpointed) and the sampler of
    the generation pipeline runs DDIM over its trailing timesteps from the saved config."""
    c = fx.tiny_config(1, **{"objective.name": "ddim_v", "train.total_steps": 2, "train.checkpoint_every_steps": 2})
    res = loop.train(c, str(tmp_path / "run"), modules=fx.make_modules(c, real_model=True),
                     make_iterator=fx.iterator_factory(), devices=jax.devices()[:1])
    assert res.final_step == 2 and all(np.isfinite(m["loss"]) for _, m in res.history)
    stage = trained.load_stage(str(tmp_path / "run"), 1)
    runner = pipeline.StageRunner(stage)
    assert isinstance(runner.objective, objectives.DDIMVPrediction)
    settings = pipeline.Settings(num_steps=3)
    np.testing.assert_array_equal(runner.time_grid(settings), [999, 666, 332])  # round(1000 - 1000 k / 3) - 1
    batch = {k: np.asarray(v) for k, v in fx.synthetic_example(0, stage.config).items()}
    batch = {k: v[None] for k, v in batch.items() if k in inputs_lib.BATCH_KEYS}
    latent = np.asarray(runner.sample(runner.conditions(batch), [0], settings))
    assert latent.shape == (1, *runner.latent_shape) and np.isfinite(latent).all()
