"""The train state: step, trainable params, AdamW state, optional EMA of the params.

The autoencoder and the text encoder are frozen: their parameters live outside this state (the `frozen` argument of
the train step), are never differentiated, are not in the optimizer and are not checkpointed (they come from
`config.autoencoder.path` / `config.text_encoder.path`, or from `config.seed` for the tiny random encoder).

Optimizer (paper: constant LR 2e-5 after 2,000 linear warm-up steps): global-norm gradient clipping, then AdamW whose
learning rate rises linearly from 0 to `optim.learning_rate` over `optim.warmup_steps` and then stays constant, or, with
`optim.cooldown_steps`, falls linearly to 0 over the last that many of `train.total_steps` (warmup-stable-decay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ttm_jax import config as config_lib
from ttm_jax.runtime import compile as compile_lib
from ttm_jax.runtime import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    """step int32 `[]` (optimizer updates done), params, opt_state (optax), ema_params (params-shaped, or None)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int | None = None) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate` over `warmup_steps`, then constant; with a cooldown
    (`optim.cooldown_steps` > 0 or `optim.cooldown_fraction` > 0, which need `total_steps`), a linear fall to 0 over
    the last `config.cooldown_steps(optim, total_steps)` of them."""
    lr, warmup = float(optim.learning_rate), int(optim.warmup_steps)
    if (optim.cooldown_steps or optim.cooldown_fraction) and total_steps is None:
        raise ValueError("optim.cooldown_steps (or cooldown_fraction) needs train.total_steps: pass total_steps")
    cool = config_lib.cooldown_steps(optim, total_steps) if total_steps is not None else 0
    parts, boundaries = [], []
    if warmup > 0:
        parts.append(optax.linear_schedule(0.0, lr, warmup))
        boundaries.append(warmup)
    if cool > 0:
        start = int(total_steps) - cool
        if start < warmup:
            raise ValueError(f"optim.cooldown_steps={cool} starts before the warm-up ends ({warmup} steps of "
                             f"{total_steps}); lower it or raise train.total_steps")
        if start > warmup:
            parts.append(optax.constant_schedule(lr))
            boundaries.append(start)
        parts.append(optax.linear_schedule(lr, 0.0, cool))
    else:
        parts.append(optax.constant_schedule(lr))
    return parts[0] if len(parts) == 1 else optax.join_schedules(parts, boundaries=boundaries)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int | None = None) -> optax.GradientTransformation:
    """Gradient clipping (`grad_clip_norm`, 0: off) then AdamW (`b1`, `b2`, `eps`, `weight_decay`) on
    `learning_rate_schedule(optim, total_steps)`."""
    parts = []
    if optim.grad_clip_norm and optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip_norm)))
    parts.append(optax.adamw(learning_rate_schedule(optim, total_steps), b1=float(optim.b1), b2=float(optim.b2),
                             eps=float(optim.eps), weight_decay=float(optim.weight_decay)))
    return optax.chain(*parts)


def create(params: Any, tx: optax.GradientTransformation, ema_decay: float) -> TrainState:
    """A fresh state at step 0 around `params` (boxed or not; boxes carry through to the moments)."""
    ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema)


def ema_decay_at(step: jax.Array | int, ema_decay: float) -> jax.Array:
    """The EMA decay of update `step` (0-based): `min(ema_decay, (1 + step) / (10 + step))`, float32 `[]`."""
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + n) / (10.0 + n))


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, ema_decay: float) -> TrainState:
    """One optimizer update; the EMA follows `ema <- d_n ema + (1 - d_n) params` after it, with the usual warm-up
    `d_n = min(d, (1 + n) / (10 + n))` at update n (0-based: `state.step` before it): early updates weigh the new
    params heavily, so the EMA does not hold `d^n` of the random initial weights (22% at 1,500 steps, d = 0.999)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        d = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype), ema, params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def state_shardings(abstract_boxed_params: Any, tx: optax.GradientTransformation, ema_decay: float,
                    mesh: jax.sharding.Mesh, rules: sharding_lib.Rules, shard_unannotated: bool = True) -> Any:
    """`NamedSharding`s for the whole `TrainState`: moments and EMA follow the params, counters replicated."""
    param_sh = sharding_lib.tree_shardings(abstract_boxed_params, mesh, rules, shard_unannotated=shard_unannotated)
    params_def = jax.tree.structure(param_sh)
    abstract_params = sharding_lib.unbox(abstract_boxed_params)
    abstract_state = jax.eval_shape(lambda p: create(p, tx, ema_decay), abstract_params)
    replicated = sharding_lib.replicated(mesh)
    return TrainState(
        step=replicated,
        params=param_sh,
        opt_state=sharding_lib.like_params(abstract_state.opt_state, params_def, param_sh, mesh),
        ema_params=param_sh if ema_decay > 0 else None,
    )


def init_state(init_params: Callable[[jax.Array], Any], rng: jax.Array, tx: optax.GradientTransformation,
               ema_decay: float, mesh: jax.sharding.Mesh, rules: sharding_lib.Rules,
               shard_unannotated: bool = True, compiler_options: dict[str, Any] | None = None,
               cache_key: tuple | None = None) -> tuple[TrainState, TrainState]:
    """Build the state born sharded: `init_params(rng)` returns the (boxed) params. Returns (state, shardings).

    The one way a fresh state is made (training, tests, benchmarks). `cache_key` (`runtime.compile.cache_key`) keeps
    the jitted init for later calls in the same process."""
    abstract = jax.eval_shape(init_params, rng)
    shardings = state_shardings(abstract, tx, ema_decay, mesh, rules, shard_unannotated)

    def build():
        # no mesh context: the init forward pass runs on dummy inputs whose batch need not divide the mesh
        return jax.jit(lambda r: create(sharding_lib.unbox(init_params(r)), tx, ema_decay), out_shardings=shardings)

    fn = build() if cache_key is None else compile_lib.cached(cache_key, build)
    return compile_lib.call(fn, compiler_options, rng), shardings


def abstract_state(init_params: Callable[[jax.Array], Any], rng: jax.Array, tx: optax.GradientTransformation,
                   ema_decay: float, shardings: TrainState) -> TrainState:
    """`jax.ShapeDtypeStruct`s of the state carrying `shardings` (the restore target for Orbax)."""
    shapes = jax.eval_shape(lambda r: create(sharding_lib.unbox(init_params(r)), tx, ema_decay), rng)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def param_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
