"""Self-conditioning (`model.self_condition`; Chen et al. 2023, "Analog Bits"): the config's channel count and check,
training's two-pass input (the first pass's clean estimate, gradient-free, on half the examples), both samplers
carrying the previous step's estimate, and a stage trained with it sampling through the generation pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives
from ttm_jax.diffusion import ddim, flow, samplers


def _objective(name: str):
    c = config_lib.build(1, "tiny")
    c.objective.name = name
    return objectives.make_objective(c.objective)


def test_config_adds_one_latent_of_input_channels_and_checks_the_field():
    c = fx.tiny_config(1)
    base = config_lib.in_channels(c)
    assert not config_lib.self_condition(c)
    c.model.self_condition = True
    assert config_lib.in_channels(c) == base + c.autoencoder.latent_channels
    config_lib.validate(c)
    del c.model["self_condition"]  # as a hand-edited config.json would hold it
    c.model.self_condition = "yes"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.self_condition: 'yes' must be True or False"):
        config_lib.validate(c)
    # a config saved before the field existed reads as off (config.upgrade, wherever a saved config is read)
    del c.model["self_condition"]
    c = config_lib.upgrade(c)
    assert not config_lib.self_condition(c) and config_lib.in_channels(c) == base


def test_draw_adds_the_coins_and_keeps_every_other_value():
    """A run with self-conditioning draws the same times, noise and dropout as one without (its coins come from a
    key of their own), and about half the examples get the estimate."""
    c = config_lib.build(1, "tiny")
    rng = jax.random.PRNGKey(3)
    plain = inputs_lib.draw(rng, 256, (2, 2, 2, 3), c.objective)
    with_sc = inputs_lib.draw(rng, 256, (2, 2, 2, 3), c.objective, self_condition=True)
    assert "self_cond" not in plain and set(with_sc) == set(plain) | {"self_cond"}
    for k, v in plain.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(with_sc[k]))
    coins = np.asarray(with_sc["self_cond"])
    assert coins.dtype == bool and 96 < coins.sum() < 160
    # fresh each step, and not tied to the condition dropout
    other = inputs_lib.draw(jax.random.PRNGKey(4), 256, (2, 2, 2, 3), c.objective, self_condition=True)
    assert (np.asarray(other["self_cond"]) != coins).any()
    for k in ("drop_image", "drop_text"):
        assert (np.asarray(with_sc[k]) != coins).any()


@pytest.mark.parametrize("name", ["ddim_v", "rectified_flow"])
def test_training_input_takes_the_first_pass_estimate_without_its_gradient(name):
    obj = _objective(name)
    rng = np.random.default_rng(0)
    c, rest = 3, 5
    noisy = jnp.asarray(rng.standard_normal((2, 2, 2, 2, c)), jnp.float32)
    others = jnp.asarray(rng.standard_normal((2, 2, 2, 2, rest)), jnp.float32)
    x = inputs_lib.with_estimate(jnp.concatenate([noisy, others], -1), jnp.zeros_like(noisy))
    np.testing.assert_array_equal(np.asarray(x[..., c:2 * c]), 0.0)
    t = jnp.asarray([900.0, 400.0]) if name == "ddim_v" else jnp.asarray([0.9, 0.4])
    rand = {"t": t, "self_cond": jnp.asarray([True, False])}

    def predict(w, inp):  # reads the noisy latent and the estimate slot, as a real backbone would
        return w * inp[..., :c] + 0.5 * inp[..., c:2 * c] + inp[..., 2 * c:3 * c]

    out = inputs_lib.self_conditioned(x, lambda inp: predict(2.0, inp), obj, rand, c)
    est = obj.clean_estimate(noisy, predict(2.0, x), t)
    np.testing.assert_allclose(np.asarray(out[0, ..., c:2 * c]), np.asarray(est[0]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[1, ..., c:2 * c]), 0.0)  # its coin says no: zeros, as step 1 sees
    np.testing.assert_array_equal(np.asarray(out[..., :c]), np.asarray(noisy))
    np.testing.assert_array_equal(np.asarray(out[..., 2 * c:]), np.asarray(others))
    # the estimate is a constant for the loss: no gradient flows back through the first pass
    grad = jax.grad(lambda w: inputs_lib.self_conditioned(x, lambda inp: predict(w, inp), obj, rand, c)
                    [..., c:2 * c].sum())(2.0)
    assert float(grad) == 0.0
    leak = jax.grad(lambda w: obj.clean_estimate(noisy, predict(w, x), t).sum())(2.0)
    assert abs(float(leak)) > 1e-3  # (what a missing stop-gradient would pass on)


def _reader(x, t):
    """A toy model that reads both halves of its input `[x, x0_prev]`, and the time."""
    c = x.shape[-1] // 2
    return 0.3 * x[..., :c] - 0.7 * x[..., c:] + 1e-3 * t.reshape((-1,) + (1,) * (x.ndim - 1))


def test_ddim_carries_the_previous_steps_clean_estimate():
    obj = _objective("ddim_v")
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 3, 3, 4)), jnp.float32)
    ts = obj.time_grid(5)
    a_t, a_prev = ddim.step_alphas(ts, obj.alphas_cumprod, obj.num_train_timesteps)
    got = jax.jit(lambda n, ts: obj.sample(_reader, n, ts, self_condition=True))(noise, jnp.asarray(ts))
    x, prev = noise, jnp.zeros_like(noise)  # the first step sees a zero estimate
    for i in range(len(ts)):
        tb = jnp.full((2,), ts[i], jnp.float32)
        v = _reader(jnp.concatenate([x, prev], -1), tb)
        prev = ddim.clean_from_velocity(x, v, jnp.full((2,), a_t[i]))
        x = ddim.ddim_step(x, v, a_t[i], a_prev[i])
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)
    # the estimate matters: a loop that fed zeros each step ends elsewhere
    zeros = obj.sample(lambda x, t: _reader(jnp.concatenate([x, jnp.zeros_like(x)], -1), t), noise, jnp.asarray(ts))
    assert np.abs(np.asarray(zeros) - np.asarray(got)).max() > 1e-2


def test_euler_carries_the_previous_steps_clean_estimate():
    noise = jnp.asarray(np.random.default_rng(2).standard_normal((2, 2, 3, 3, 4)), jnp.float32)
    ts = samplers.time_grid(4, "uniform")
    got = jax.jit(lambda n, ts: objectives.sample(_objective("rectified_flow"), _reader, n, ts,
                                                  self_condition=True))(noise, jnp.asarray(ts))
    x, prev = noise, jnp.zeros_like(noise)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        v = _reader(jnp.concatenate([x, prev], -1), jnp.full((2,), t, jnp.float32))
        prev = flow.clean_from_velocity(x, v, jnp.full((2,), t))
        x = x + (t_next - t) * v
    np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_describe_counts_the_first_pass():
    """A self-conditioned step is the backbone's forward + backward plus one more forward: between 1.2x and 1.5x
    the step without it (a forward is about a third of forward + backward), at the same batch."""
    from ttm_jax import describe

    c = config_lib.build(1, "tiny")
    plain = describe.train_step_flops(c)
    c.model.self_condition = True
    ratio = describe.train_step_flops(c) / plain
    assert 1.2 < ratio < 1.5, ratio
