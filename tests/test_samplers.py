"""Samplers: Movie Gen's linear-quadratic grid, the Euler loop (against an analytic flow and diffusers), sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule as mochi_schedule

from ttm_jax.diffusion import samplers


@pytest.mark.parametrize("num_steps", [2, 7, 20, 50, 64])
def test_linear_quadratic_matches_diffusers_mochi(num_steps):
    # diffusers' Mochi pipeline returns the N sigmas before the terminal 0 that its scheduler appends
    ours = samplers.time_grid(num_steps, "linear_quadratic")
    ref = np.asarray(mochi_schedule(num_steps, 0.025), np.float32)
    np.testing.assert_allclose(ours[:-1], ref, atol=1e-6)
    assert ours[-1] == 0.0


def test_linear_quadratic_shape_movie_gen():
    # Movie Gen: 50 steps whose first 25 are the first 25 steps of a 1000-step linear schedule
    t = samplers.time_grid(50, "linear_quadratic").astype(np.float64)
    np.testing.assert_allclose(t[:26], 1.0 - np.arange(26) / 1000.0, atol=1e-6)
    assert t[0] == 1.0 and t[-1] == 0.0 and np.all(np.diff(t) < 0)
    # the second half is a quadratic in the step index, with value and slope continuous at the switch
    k = np.arange(25, 51)
    a, b, c = np.polyfit(k, 1.0 - t[25:], 2)
    np.testing.assert_allclose(np.polyval([a, b, c], k), 1.0 - t[25:], atol=1e-6)
    np.testing.assert_allclose(2 * a * 25 + b, 0.025 / 25, rtol=1e-3)
    assert a > 0  # steps grow towards t = 0


def test_uniform_and_errors():
    np.testing.assert_allclose(samplers.time_grid(4, "uniform"), [1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="config.sample.schedule"):
        samplers.time_grid(4, "cosine")
    with pytest.raises(ValueError, match="config.sample.num_steps"):
        samplers.time_grid(0)


def _gaussian_flow(mu, s):
    """Exact velocity of the rectified flow from N(0, I) at t=1 to N(mu, s^2 I) at t=0; its ODE maps eps -> mu+s eps."""

    def velocity(x, t):
        t = t.reshape((-1,) + (1,) * (x.ndim - 1))
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    return velocity


@pytest.fixture(scope="module")
def toy():
    mu = jnp.array([2.0, -1.0, 0.5, 3.0], jnp.float32)
    s = 0.3
    noise = jax.random.normal(jax.random.PRNGKey(0), (8, 4), jnp.float32)
    return _gaussian_flow(mu, s), noise, mu + s * noise


@pytest.mark.parametrize("schedule", ["uniform", "linear_quadratic"])
def test_euler_converges_to_analytic_endpoint(toy, schedule):
    velocity, noise, exact = toy
    sample = samplers.make_sampler(velocity)
    errors = [float(jnp.max(jnp.abs(sample(noise, samplers.time_grid(n, schedule)) - exact))) for n in (100, 200, 3200)]
    assert errors[2] < 2e-3
    assert errors[0] > errors[1] > errors[2]
    # first order: doubling the steps halves the error
    assert 1.6 < errors[0] / errors[1] < 2.4


def test_euler_matches_diffusers_flow_match_scheduler():
    # a nonlinear, time-dependent velocity; diffusers' FlowMatchEulerDiscreteScheduler is the reference loop
    w = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32) / 3
    velocity = lambda x, t: jnp.tanh(x @ w) * (1 + t[:, None]) - 0.5 * x
    num_steps, shift = 12, 3.0
    noise = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)

    # diffusers applies `shift` to the given sigmas itself
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=list(samplers.time_grid(num_steps, "linear_quadratic")[:-1]))
    x = torch.from_numpy(noise)
    for ts in sched.timesteps:
        v = velocity(jnp.asarray(x.numpy()), jnp.full((3,), float(ts) / 1000.0))
        x = sched.step(torch.from_numpy(np.array(v)), ts, x, return_dict=False)[0]

    ours = samplers.make_sampler(velocity)(noise, samplers.time_grid(num_steps, "linear_quadratic", shift=shift))
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=2e-5)


def test_sharded_sampler_equals_single_device(toy):
    velocity, noise, _ = toy
    cond = jnp.arange(8.0)[:, None] * 0.1  # a batch-leading condition passed through *args
    vel = lambda x, t, c: velocity(x, t) + c
    ts = samplers.time_grid(10, "linear_quadratic")
    ref = samplers.make_sampler(vel)(noise, ts, cond)

    n = len(jax.devices())
    mesh = jax.make_mesh((1, n), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    noise_s, cond_s = samplers.shard_batch((noise, cond), mesh)
    out = samplers.make_sampler(vel, mesh=mesh)(noise_s, ts, cond_s)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert len({s.device for s in out.addressable_shards}) == n


def test_shard_batch_names_the_leaf():
    n = len(jax.devices())
    if n == 1:
        pytest.skip("needs several devices")
    mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match=r"\['latent'\].*not divisible"):
        samplers.shard_batch({"latent": np.zeros((n + 1, 2))}, mesh)
