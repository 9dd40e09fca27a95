"""Train state: warm-up-then-constant LR (paper: 2e-5 after 2,000 steps), clipping, AdamW, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttm_jax import config as config_lib
from ttm_jax.train import state as state_lib


def test_paper_schedule_warms_up_linearly_then_stays_constant():
    o = config_lib.build(2, "wan1.3b").optim
    assert (o.learning_rate, o.warmup_steps) == (2e-5, 2000)
    lr = state_lib.learning_rate_schedule(o)
    np.testing.assert_allclose([lr(0), lr(500), lr(1000), lr(2000), lr(10_000), lr(50_000)],
                               [0.0, 5e-6, 1e-5, 2e-5, 2e-5, 2e-5], rtol=1e-6, atol=1e-12)


def test_cooldown_holds_the_rate_then_falls_linearly_to_zero_over_the_last_steps():
    o = config_lib.build(1, "tiny").optim
    o.update(learning_rate=1e-3, warmup_steps=20, cooldown_steps=100)
    lr = state_lib.learning_rate_schedule(o, 300)
    np.testing.assert_allclose([lr(0), lr(10), lr(20), lr(150), lr(200), lr(250), lr(290), lr(300)],
                               [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 1e-4, 0.0], rtol=1e-5, atol=1e-9)
    # no warm-up, cooldown over the whole run; and the optimizer's updates follow the schedule
    o.update(warmup_steps=0, cooldown_steps=4)
    np.testing.assert_allclose([state_lib.learning_rate_schedule(o, 4)(i) for i in range(5)],
                               [1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0], rtol=1e-5, atol=1e-9)
    o.update(b1=0.0, b2=0.0, eps=0.0, grad_clip_norm=0.0)  # plain sign-SGD: |update| = lr
    tx = state_lib.make_optimizer(o, 4)
    params = {"w": jnp.zeros((2,))}
    s = state_lib.create(params, tx, 0.0)
    moved = []
    for _ in range(4):
        before = s.params["w"]
        s = state_lib.apply_gradients(s, _grads(params, 1.0), tx, 0.0)
        moved.append(float(before[0] - s.params["w"][0]))
    np.testing.assert_allclose(moved, [1e-3, 7.5e-4, 5e-4, 2.5e-4], rtol=1e-4)
    with pytest.raises(ValueError, match="needs train.total_steps"):
        state_lib.learning_rate_schedule(o)
    # the fall right after the warm-up (no constant phase)
    o.update(warmup_steps=2, cooldown_steps=4)
    np.testing.assert_allclose([state_lib.learning_rate_schedule(o, 6)(i) for i in range(7)],
                               [0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0], rtol=1e-5, atol=1e-9)


def test_cooldown_longer_than_the_run_fails_the_config_check():
    c = config_lib.build(1, "tiny")
    c.optim.cooldown_steps = c.train.total_steps
    with pytest.raises(config_lib.ConfigError, match="config.optim.cooldown_steps"):
        config_lib.validate(c)
    c.optim.cooldown_steps = c.train.total_steps - c.optim.warmup_steps + 1  # it would start inside the warm-up
    with pytest.raises(config_lib.ConfigError, match="config.optim.cooldown_steps"):
        config_lib.validate(c)
    c.optim.cooldown_steps = c.train.total_steps - c.optim.warmup_steps
    config_lib.validate(c)
    c = config_lib.build(1, "tiny")
    c.optim.cooldown_steps = True  # not an int
    with pytest.raises(config_lib.ConfigError, match="config.optim.cooldown_steps"):
        config_lib.validate(c)


def _grads(params, scale):
    return jax.tree.map(lambda p: jnp.full_like(p, scale), params)


def test_adamw_with_clipping_matches_optax_reference_and_ema_follows():
    o = config_lib.build(2, "tiny").optim
    o.update(learning_rate=0.1, warmup_steps=0, grad_clip_norm=1.0, weight_decay=0.01, ema_decay=0.9, cooldown_steps=0,
             cooldown_fraction=0.0)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))}
    tx = state_lib.make_optimizer(o)
    s = state_lib.create(params, tx, o.ema_decay)
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, b1=o.b1, b2=o.b2, eps=o.eps,
                                                                     weight_decay=0.01))
    ref_p, ref_o, ema = params, ref_tx.init(params), params
    for i in range(3):
        g = _grads(params, 10.0 * (i + 1))  # norm far above 1: clipping acts
        s = state_lib.apply_gradients(s, g, tx, o.ema_decay)
        upd, ref_o = ref_tx.update(g, ref_o, ref_p)
        ref_p = optax.apply_updates(ref_p, upd)
        d = min(0.9, (1 + i) / (10 + i))  # the warm-up: 0.1, 0.18, 0.25 at updates 0, 1, 2
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, ref_p)
    assert int(s.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s.params, ref_p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s.ema_params, ema)
    # no EMA: nothing stored
    assert state_lib.create(params, tx, 0.0).ema_params is None


def test_ema_warm_up_forgets_the_initial_weights():
    """Without a warm-up, after n updates the EMA holds d^n of the random initial weights (22% at 1,500 steps for
    d = 0.999); with `min(d, (1 + n) / (10 + n))` that share is the product of the decays (below 1e-3)."""
    d = [float(state_lib.ema_decay_at(n, 0.999)) for n in range(1500)]
    np.testing.assert_allclose(d[:3], [0.1, 2 / 11, 3 / 12], rtol=1e-6)
    assert d[-1] == pytest.approx(1500 / 1509, abs=1e-6)  # still warming up at 1,500 steps ...
    assert float(state_lib.ema_decay_at(20_000, 0.999)) == pytest.approx(0.999, abs=1e-6)  # ... capped at d later
    share = float(np.prod(np.asarray(d, np.float64)))
    assert share < 1e-3 < 0.999**1500  # the initial weights' share of the EMA, with and without the warm-up
    # the same through the state: a constant params tree after one update from zeros
    tx = optax.sgd(0.0)
    s = state_lib.create({"w": jnp.zeros(3)}, tx, 0.999)
    s = s.replace(params={"w": jnp.ones(3)})
    s = state_lib.apply_gradients(s, {"w": jnp.zeros(3)}, tx, 0.999)
    np.testing.assert_allclose(s.ema_params["w"], 0.9, rtol=1e-6)  # 0.1 * 0 + 0.9 * 1, not 0.001


@pytest.mark.parametrize("field,value", [("optim.ema_decay", 1.0), ("train.grad_accum_steps", 3),
                                         ("objective.drop_both_prob", 0.95), ("mesh.distributed", "always")])
def test_config_checks_name_the_field(field, value):
    c = config_lib.build(2, "tiny")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}" if field != "objective.drop_both_prob"
                       else "config.objective"):
        config_lib.validate(c)


def test_compiled_step_cache_tells_run_lengths_apart_only_when_the_schedule_depends_on_them():
    """The train step closes over the schedule: with a cooldown its fall starts at total_steps - cooldown_steps, so
    a longer run must not reuse a shorter one's compiled step (whose rate would sit at 0)."""
    from ttm_jax.runtime import compile as compile_lib
    from ttm_jax.runtime import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(config_lib.build(1, "tiny").mesh)
    modules = object()

    def key(total, cool):
        c = config_lib.build(1, "tiny")
        c.train.total_steps, c.optim.cooldown_steps, c.optim.cooldown_fraction = total, cool, 0.0
        return compile_lib.cache_key(c, modules, mesh, "train_step")

    assert key(600, 0) == key(900, 0)  # constant LR: the run's length only bounds it
    assert key(600, 100) != key(900, 100)
    assert key(600, 100) != key(600, 200)
