"""DDPM noise schedules with zero terminal SNR, v-prediction and the deterministic DDIM sampler (the U-Net's objective).

Convention (diffusers' `DDIMScheduler`): integer timesteps `t = 0 .. T-1` (T = `num_train_timesteps`, 1000), `t = 0`
nearly clean, `t = T-1` the noisiest; `a_t = alphas_cumprod[t]`.

  x_t    = sqrt(a_t) x0 + sqrt(1 - a_t) eps
  v      = sqrt(a_t) eps - sqrt(1 - a_t) x0            (v-prediction, Salimans & Ho 2022)
  x0     = sqrt(a_t) x_t - sqrt(1 - a_t) v,   eps = sqrt(a_t) v + sqrt(1 - a_t) x_t

Betas: `scaled_linear` (Stable Diffusion: linear in sqrt(beta) from `beta_start` to `beta_end`) or `linear`, then,
with `rescale_zero_terminal_snr`, rescaled so that sqrt(a_t) falls linearly to exactly 0 at `t = T-1` while keeping
sqrt(a_0) (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1). The last
training step is then pure noise, as sampling starts: with v-prediction the model still has a target there
(`v = -x0`), which eps-prediction would not. Sampling timesteps are `trailing` (from T-1 down, the paper's choice),
`leading` or `linspace`, as diffusers spaces them; DDIM with eta = 0 steps from `t` to `t - T // N`, and past 0 to
`a = 1` (diffusers' `set_alpha_to_one`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")
SPACINGS = ("trailing", "leading", "linspace")


def betas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
          schedule: str = "scaled_linear", rescale_zero_terminal_snr: bool = True) -> np.ndarray:
    """float64 `[T]` betas."""
    if schedule == "scaled_linear":
        b = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif schedule == "linear":
        b = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"config.objective.beta_schedule: {schedule!r}; choose one of {BETA_SCHEDULES}")
    return rescale_to_zero_terminal_snr(b) if rescale_zero_terminal_snr else b


def rescale_to_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Betas whose sqrt(alphas_cumprod) is the original's shifted to end at 0 and scaled to keep its first value."""
    s = np.sqrt(np.cumprod(1.0 - b))
    first, last = s[0], s[-1]
    s = (s - last) * first / (first - last)
    a = s ** 2
    alphas = np.concatenate([a[:1], a[1:] / a[:-1]])
    return 1.0 - alphas


def alphas_cumprod(**kw: Any) -> np.ndarray:
    """float64 `[T]` (keywords of `betas`)."""
    return np.cumprod(1.0 - betas(**kw))


def timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "trailing") -> np.ndarray:
    """Descending int64 sampling timesteps `[num_steps]`, spaced as diffusers' `DDIMScheduler.set_timesteps`."""
    t_max = int(num_train_timesteps)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= t_max:
        raise ValueError(f"ddim.timesteps: num_steps={num_steps!r} must be an int in [1, {t_max}] "
                         f"(config.sample.num_steps)")
    if spacing == "trailing":
        ts = np.round(np.arange(t_max, 0, -t_max / num_steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (t_max // num_steps)).round()[::-1].astype(np.int64)
    elif spacing == "linspace":
        ts = np.linspace(0, t_max - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"config.objective.timestep_spacing: {spacing!r}; choose one of {SPACINGS}")
    return ts


def _bcast(a: jax.Array, x: jax.Array) -> jax.Array:
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def gather(table: jax.Array, t: jax.Array) -> jax.Array:
    """`table[t]` for float or int timesteps `t [B]` (rounded), as float32."""
    return jnp.asarray(table, jnp.float32)[jnp.round(t).astype(jnp.int32)]


def add_noise(x0: jax.Array, eps: jax.Array, a: jax.Array) -> jax.Array:
    """`sqrt(a) x0 + sqrt(1 - a) eps`, `a [B]` the alphas_cumprod of each example's timestep."""
    a = _bcast(a, x0)
    return (jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * eps.astype(jnp.float32)).astype(x0.dtype)


def velocity(x0: jax.Array, eps: jax.Array, a: jax.Array) -> jax.Array:
    """The v-prediction target `sqrt(a) eps - sqrt(1 - a) x0`."""
    a = _bcast(a, x0)
    return (jnp.sqrt(a) * eps.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)).astype(x0.dtype)


def clean_from_velocity(x: jax.Array, v: jax.Array, a: jax.Array) -> jax.Array:
    """The clean-sample estimate `sqrt(a) x_t - sqrt(1 - a) v`, `a [B]` each example's alphas_cumprod (float32)."""
    a = _bcast(jnp.asarray(a, jnp.float32), x)
    return jnp.sqrt(a) * x.astype(jnp.float32) - jnp.sqrt(1.0 - a) * v.astype(jnp.float32)


def ddim_step(x: jax.Array, v: jax.Array, a: jax.Array, a_prev: jax.Array) -> jax.Array:
    """One deterministic DDIM step (eta = 0) from `x` at alphas_cumprod `a` to `a_prev`, given the predicted `v`;
    float32 math. `a`, `a_prev`: scalars or `[B]`."""
    x32, v32 = x.astype(jnp.float32), v.astype(jnp.float32)
    a, a_prev = jnp.broadcast_to(a, x.shape[:1]), jnp.broadcast_to(a_prev, x.shape[:1])
    sa, sb = jnp.sqrt(_bcast(a, x32)), jnp.sqrt(1.0 - _bcast(a, x32))
    x0 = clean_from_velocity(x32, v32, a)
    eps = sa * v32 + sb * x32
    return (jnp.sqrt(_bcast(a_prev, x32)) * x0 + jnp.sqrt(1.0 - _bcast(a_prev, x32)) * eps).astype(x.dtype)


def step_alphas(ts: jax.Array, acp: np.ndarray, num_train_timesteps: int, final_alpha: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
    """`(a_t, a_prev)` float32 `[N]` for descending timesteps `ts [N]` (traceable): as diffusers' `DDIMScheduler.step`,
    the step from `t` goes to `t - T // N` (the next timestep for trailing spacing when N divides T), and below 0 to
    `final_alpha`."""
    ts = jnp.round(jnp.asarray(ts, jnp.float32)).astype(jnp.int32)
    prev = ts - int(num_train_timesteps) // ts.shape[0]
    acp = jnp.asarray(acp, jnp.float32)
    return acp[ts], jnp.where(prev >= 0, acp[jnp.maximum(prev, 0)], jnp.float32(final_alpha))


def ddim_sample(model_fn: Callable[..., jax.Array], noise: jax.Array, ts: jax.Array, a_t: jax.Array,
                a_prev: jax.Array, *args: Any, self_condition: bool = False) -> jax.Array:
    """DDIM (eta = 0) over descending timesteps `ts [N]` (floats) with their `step_alphas`: `model_fn(x, t [B],
    *args) -> v`. Traceable (`lax.fori_loop`). With `self_condition`, `model_fn` takes `[x, x0_prev]` concatenated on
    the channels: the previous step's clean estimate (zeros at the first step)."""
    ts = jnp.asarray(ts, jnp.float32)
    a_t, a_prev = jnp.asarray(a_t, jnp.float32), jnp.asarray(a_prev, jnp.float32)
    batch = noise.shape[0]

    def body(i, carry):
        x, x0_prev = carry
        inp = jnp.concatenate([x, x0_prev.astype(x.dtype)], axis=-1) if self_condition else x
        v = model_fn(inp, jnp.full((batch,), ts[i], jnp.float32), *args)
        x0 = clean_from_velocity(x, v, jnp.broadcast_to(a_t[i], (batch,))) if self_condition else x0_prev
        return ddim_step(x, v, a_t[i], a_prev[i]), x0

    init = (noise, jnp.zeros(noise.shape, jnp.float32) if self_condition else jnp.zeros((), jnp.float32))
    return jax.lax.fori_loop(0, ts.shape[0], body, init)[0]
