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


def _grads(params, scale):
    return jax.tree.map(lambda p: jnp.full_like(p, scale), params)


def test_adamw_with_clipping_matches_optax_reference_and_ema_follows():
    o = config_lib.build(2, "tiny").optim
    o.update(learning_rate=0.1, warmup_steps=0, grad_clip_norm=1.0, weight_decay=0.01, ema_decay=0.9)
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
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, ref_p)
    assert int(s.step) == 3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s.params, ref_p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s.ema_params, ema)
    # no EMA: nothing stored
    assert state_lib.create(params, tx, 0.0).ema_params is None


@pytest.mark.parametrize("field,value", [("optim.ema_decay", 1.0), ("train.grad_accum_steps", 3),
                                         ("objective.drop_both_prob", 0.95), ("mesh.distributed", "always")])
def test_config_checks_name_the_field(field, value):
    c = config_lib.build(2, "tiny")
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.{field}" if field != "objective.drop_both_prob"
                       else "config.objective"):
        config_lib.validate(c)
