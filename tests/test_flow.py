"""Rectified-flow objective (ttm_jax/diffusion/flow.py): path, target, time sampling, shift, condition dropout."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ttm_jax import config as config_lib
from ttm_jax.diffusion import flow


def _objective(**kw) -> ml_collections.ConfigDict:
    o = config_lib.build(2, "tiny").objective
    o.update(kw)
    return o


def test_path_endpoints_and_velocity_is_the_time_derivative():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.normal(k1, (3, 2, 4, 4, 5))
    eps = jax.random.normal(k2, x0.shape)
    t = jax.random.uniform(k3, (3,), minval=0.1, maxval=0.9)
    np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.zeros(3)), x0, atol=0)
    np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.ones(3)), eps, atol=0)
    h = 1e-2
    fd = (flow.interpolate(x0, eps, t + h) - flow.interpolate(x0, eps, t - h)) / (2 * h)
    np.testing.assert_allclose(fd, flow.velocity_target(x0, eps), atol=1e-4)
    # each example follows its own t
    xt = flow.interpolate(x0, eps, t)
    np.testing.assert_allclose(xt[1], (1 - t[1]) * x0[1] + t[1] * eps[1], rtol=1e-6)


def test_euler_with_the_true_velocity_recovers_data_in_one_step():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x0 = jax.random.normal(k1, (2, 3, 4))
    eps = jax.random.normal(k2, x0.shape)
    x = flow.euler_step(eps, flow.velocity_target(x0, eps), jnp.ones(2), jnp.zeros(2))
    np.testing.assert_allclose(x, x0, atol=1e-6)


def test_shift_and_timesteps_match_diffusers_flow_match_scheduler():
    sig = np.linspace(1.0, 0.02, 12).astype(np.float32)
    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    shifted.set_timesteps(sigmas=sig.tolist())
    np.testing.assert_allclose(flow.shift_time(jnp.asarray(sig), 3.0), shifted.sigmas[:-1].numpy(), rtol=1e-5)
    np.testing.assert_allclose(flow.wan_timestep(jnp.asarray(shifted.sigmas[:-1].numpy())),
                               shifted.timesteps.numpy(), rtol=1e-5)


def test_logit_normal_times_have_the_configured_logit_moments_and_shift():
    n = 20000
    rng = jax.random.PRNGKey(2)
    t = np.asarray(flow.sample_time(rng, n, _objective(t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8,
                                                        shift=1.0)))
    assert t.min() > 0 and t.max() < 1
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    # the shift maps each draw through t' = s t / (1 + (s-1) t): same rng, shifted values
    ts = np.asarray(flow.sample_time(rng, n, _objective(t_sampling="logit_normal", logit_mean=0.5, logit_std=0.8,
                                                         shift=3.0)))
    np.testing.assert_allclose(ts, 3 * t / (1 + 2 * t), rtol=1e-5)
    assert np.median(ts) > np.median(t)  # towards noise


def test_uniform_times():
    t = np.asarray(flow.sample_time(jax.random.PRNGKey(3), 20000, _objective(t_sampling="uniform", shift=1.0)))
    assert t.min() >= 0 and t.max() < 1
    hist, _ = np.histogram(t, bins=4, range=(0, 1))
    np.testing.assert_allclose(hist / len(t), 0.25, atol=0.02)
    with pytest.raises(ValueError, match="config.objective.t_sampling"):
        flow.sample_time(jax.random.PRNGKey(3), 4, _objective(t_sampling="cosine"))


def test_condition_dropout_events_are_disjoint_with_configured_rates():
    o = _objective(drop_image_prob=0.1, drop_text_prob=0.2, drop_both_prob=0.15)
    img, txt = (np.asarray(m) for m in flow.dropout_masks(jax.random.PRNGKey(4), 100_000, o))
    assert abs((img & ~txt).mean() - 0.1) < 0.005
    assert abs((txt & ~img).mean() - 0.2) < 0.005
    assert abs((img & txt).mean() - 0.15) < 0.005
    assert abs((~img & ~txt).mean() - 0.55) < 0.005
    none = flow.dropout_masks(jax.random.PRNGKey(4), 1000, _objective(drop_image_prob=0.0, drop_text_prob=0.0,
                                                                       drop_both_prob=0.0))
    assert not np.any(np.asarray(none[0])) and not np.any(np.asarray(none[1]))


def test_dropped_image_is_zeros_and_dropped_text_is_the_empty_prompt():
    cond = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4) + 1
    drop = jnp.array([True, False])
    out = flow.drop_image(cond, drop)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(out[1], cond[1])
    emb = jnp.ones((2, 5, 3))
    empty = jnp.full((1, 5, 3), -2.0)
    out = flow.drop_text(emb, empty, drop)
    np.testing.assert_array_equal(out[0], empty[0])
    np.testing.assert_array_equal(out[1], emb[1])


def test_loss_is_mse_and_weights_examples():
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    pred, target = jax.random.normal(k1, (3, 2, 4)), jax.random.normal(k2, (3, 2, 4))
    ref = torch.nn.functional.mse_loss(torch.tensor(np.asarray(pred)), torch.tensor(np.asarray(target)))
    np.testing.assert_allclose(flow.loss(pred, target), ref.item(), rtol=1e-6)
    w = jnp.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(flow.loss(pred, target, w), jnp.mean((pred[0] - target[0]) ** 2), rtol=1e-6)
