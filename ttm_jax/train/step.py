"""The jitted train step: `(state, frozen, batch) -> (state, metrics)`.

One step:
  1. the step's RNG is `fold_in(PRNGKey(config.seed), state.step)`; noise, times and dropout are drawn from it for
     the whole global batch before any split (`inputs.draw`), so a resumed run, any mesh and any accumulation split
     see exactly the same values per example;
  2. the stage's inputs and loss target (`ttm_jax.assembly.inputs.model_inputs`: latents, text, object ids, the
     objective's noisy input and target, condition dropout);
  3. with `model.self_condition`, a first gradient-free pass whose clean estimate joins the input of half the
     examples (`inputs.self_conditioned`); the objective's loss; gradients averaged over `train.grad_accum_steps`
     micro-batches (`lax.scan`; micro-batch i takes examples i, i+A, i+2A, ..., so each device keeps working on its
     own rows), one optimizer update;
  4. the update is kept only when the loss, the gradient norm and the new parameters' norm are finite (metric
     `nonfinite` = 1 otherwise, and the state is returned unchanged; the loop stops on it before saving).
The state is donated; in/out shardings are explicit (`state_shardings`, batch split over data x fsdp).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ttm_jax import config as config_lib
from ttm_jax.assembly import inputs as inputs_lib
from ttm_jax.assembly import objectives
from ttm_jax.assembly.modules import Modules
from ttm_jax.runtime import compile as compile_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import state as state_lib


def make_loss_fn(config: ml_collections.ConfigDict, modules: Modules) -> Callable[..., tuple[jax.Array, dict]]:
    """`(params, frozen, batch, rand) -> (loss, aux)`: the objective's loss of one (micro-)batch."""
    objective = objectives.make_objective(config.objective)
    self_cond = config_lib.self_condition(config)

    def loss_fn(params, frozen, batch, rand):
        x, kwargs, target = inputs_lib.model_inputs(config, modules, frozen, batch, rand)
        timestep, context = kwargs.pop("timestep"), kwargs.pop("context")
        predict = lambda inp: modules.model.apply({"params": params}, inp, timestep, context, **kwargs)
        if self_cond:
            x = inputs_lib.self_conditioned(x, predict, objective, rand, target.shape[-1])
        return objective.loss(predict(x), target, rand["t"]), {}

    return loss_fn


def _microbatches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """`[B, ...]` -> `[A, B/A, ...]`, micro-batch i = rows i, i+A, ... (device-local under batch sharding)."""

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"config.train.grad_accum_steps: {accum} does not divide the batch {x.shape[0]}; "
                             f"make train.batch_size a multiple of it")
        return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(config: ml_collections.ConfigDict, modules: Modules, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules: sharding_lib.Rules, state_shardings: state_lib.TrainState,
                    frozen_shardings: Any, batch_shardings: dict[str, Any]) -> Callable:
    """The jitted `(state, frozen, batch) -> (state, metrics)`; the state is donated (cached per config/mesh)."""
    key = compile_lib.cache_key(config, modules, mesh, "train_step", rules, state_shardings, frozen_shardings,
                                batch_shardings)
    return compile_lib.cached(key, lambda: _make_train_step(config, modules, tx, mesh, rules, state_shardings,
                                                            frozen_shardings, batch_shardings))


def _make_train_step(config, modules, tx, mesh, rules, state_shardings, frozen_shardings, batch_shardings):
    loss_fn = make_loss_fn(config, modules)
    accum = int(config.train.grad_accum_steps)
    ema_decay = float(config.optim.ema_decay)
    schedule = state_lib.learning_rate_schedule(config.optim, config.train.total_steps)
    base_rng = jax.random.PRNGKey(int(config.seed))
    latent = config_lib.latent_shape(config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        batch = {k: v for k, v in batch.items() if k in inputs_lib.BATCH_KEYS}
        rng = jax.random.fold_in(base_rng, state.step)
        b = next(iter(batch.values())).shape[0]
        rand = inputs_lib.draw(rng, b, latent, config.objective, config_lib.self_condition(config))
        if accum == 1:
            (loss, _), grads = grad_fn(state.params, frozen, batch, rand)
        else:
            micro = _microbatches({"batch": batch, "rand": rand}, accum)
            micro_sh = jax.tree.map(lambda v: jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(None, mesh_lib.batch_axes(mesh), *([None] * (v.ndim - 2)))), micro)
            micro = jax.lax.with_sharding_constraint(micro, micro_sh)
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

            def body(carry, mb):
                (mb_loss, _), g = grad_fn(state.params, frozen, mb["batch"], mb["rand"])
                acc_l, acc_g = carry
                return (acc_l + mb_loss, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)), None

            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
            loss = loss / accum
            grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, state.params)
        grad_norm = optax.global_norm(grads)
        new_state = state_lib.apply_gradients(state, grads, tx, ema_decay)
        param_norm = optax.global_norm(new_state.params)
        # an update with a non-finite loss, gradient or resulting parameter norm is never applied: the state stays
        # as it was (the loop then stops before any save), so no checkpoint ever holds it
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "param_norm": param_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return new_state, metrics

    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    step_fn = compile_lib.compile_once(jitted, compile_lib.compiler_options(config))

    def run(state, frozen, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return step_fn(state, frozen, batch)

    run.jitted = jitted  # for `.lower(...)` (memory analysis in bench/)
    return run


def batch_shardings(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    return {k: sharding_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items() if k in inputs_lib.BATCH_KEYS}


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global `jax.Array`s (`make_array_from_process_local_data`); keys outside
    `inputs.BATCH_KEYS` are dropped."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in local.items() if k in shardings}
