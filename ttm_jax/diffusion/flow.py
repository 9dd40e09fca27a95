"""Rectified flow, the DiT's training objective (as Wan 2.1 / SD3 / Movie Gen).

Convention: `t = 0` is data, `t = 1` is noise.

  x_t    = (1 - t) x0 + t eps              (straight line from the clean latent to Gaussian noise)
  target = eps - x0                        (the velocity d x_t / d t the model predicts)

Training times `t` are drawn logit-normal (SD3) or uniform, then shifted towards noise by `shift`
(`t' = s t / (1 + (s - 1) t)`, Wan's `sample_shift`), since large video latents stay recognisable at moderate noise.
Wan's DiT takes the timestep in units of 0..1000: `wan_timestep(t) = 1000 t`.

Condition dropout for InstructPix2Pix guidance: per example, with probability `drop_image_prob` only the image
conditions are dropped (zeros), with `drop_text_prob` only the text (replaced by the empty prompt's embedding), with
`drop_both_prob` both; the three events are disjoint, so the model learns the four terms the two-scale guidance needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

WAN_TIMESTEP_SCALE = 1000.0


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """`t' = s t / (1 + (s - 1) t)`: monotone map of [0, 1] onto itself; `s > 1` moves mass towards noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng: jax.Array, batch_size: int, objective: ml_collections.ConfigDict) -> jax.Array:
    """Training times, float32 `[B]` in (0, 1), from `config.objective` (t_sampling, logit_mean/std, shift)."""
    if objective.t_sampling == "logit_normal":
        u = objective.logit_mean + objective.logit_std * jax.random.normal(rng, (batch_size,), jnp.float32)
        t = jax.nn.sigmoid(u)
    elif objective.t_sampling == "uniform":
        t = jax.random.uniform(rng, (batch_size,), jnp.float32)
    else:
        raise ValueError(f"config.objective.t_sampling: {objective.t_sampling!r}; choose logit_normal or uniform")
    return shift_time(t, float(objective.shift))


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def interpolate(x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """`x_t = (1 - t) x0 + t eps`; x0/eps `[B, ...]`, t `[B]`."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """`eps - x0`, the velocity of the straight path (constant along it)."""
    return eps - x0


def clean_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """`x_t - t v`: the end (t = 0) of the straight path the velocity `v` points along; t `[B]`."""
    return x_t - _bcast(t, x_t) * v


def wan_timestep(t: jax.Array) -> jax.Array:
    """The DiT's timestep input: `1000 t` (Wan's units)."""
    return t * WAN_TIMESTEP_SCALE


def euler_step(x_t: jax.Array, velocity: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One first-order step of `dx/dt = v` from `t` to `t_next` (`t_next < t` when sampling); t, t_next `[B]`."""
    return x_t + _bcast(t_next - t, x_t) * velocity


def dropout_masks(rng: jax.Array, batch_size: int, objective: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """Which examples lose which conditions: `(drop_image bool [B], drop_text bool [B])`.

    One uniform draw per example picks one of four disjoint events: image only (`drop_image_prob`), text only
    (`drop_text_prob`), both (`drop_both_prob`), neither (the rest).
    """
    p_i, p_t, p_b = float(objective.drop_image_prob), float(objective.drop_text_prob), float(objective.drop_both_prob)
    u = jax.random.uniform(rng, (batch_size,), jnp.float32)
    image_only = u < p_i
    text_only = (u >= p_i) & (u < p_i + p_t)
    both = (u >= p_i + p_t) & (u < p_i + p_t + p_b)
    return image_only | both, text_only | both


def drop_image(cond: jax.Array, drop: jax.Array) -> jax.Array:
    """Zero the image condition `[B, ...]` of the examples where `drop [B]` is true."""
    return jnp.where(_bcast(drop, cond).astype(bool), jnp.zeros_like(cond), cond)


def drop_text(emb: jax.Array, empty: jax.Array, drop: jax.Array) -> jax.Array:
    """Replace text embeddings `[B, L, D]` by the empty prompt's `empty [1 or B, L, D]` where `drop [B]` is true."""
    empty = jnp.broadcast_to(empty.astype(emb.dtype), emb.shape)
    return jnp.where(drop[:, None, None], empty, emb)


def loss(pred: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Mean squared error over all elements, in float32; `weight [B]` (optional) weighs examples."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    if weight is None:
        return jnp.mean(per_example)
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1e-12)
