"""Training objectives behind one interface: what the model is trained to predict and how samples are drawn.

An `Objective` owns the four places where a diffusion formulation shows up:
  time sampling     `sample_time(rng, B) -> t [B]` (training times, in the objective's own units)
  noisy input       `noisy(x0, eps, t) -> x_t`
  loss target       `target(x0, eps, t) -> y` and `loss(pred, y, t)` (the model regresses `y`; `t` for weighting)
  model time        `model_time(t) -> timestep` as the backbone takes it
  sampling          `time_grid(num_steps, schedule, shift) -> ts [N + 1]` and `sample(model_fn, noise, ts, *args)`
                    (`model_fn(x, t, *args)` -> the model's prediction; the objective's sampler turns it into steps;
                    `self_condition=True`: `x` carries the previous step's clean estimate on the channels)
  clean estimate    `clean_estimate(x_t, pred, t) -> x0_hat` (what one step from `t` says the sample is) and
                    `time_at(level)`: the objective's time at a noise level in [0, 1] (1: pure noise), for probes

`rectified_flow` (the DiT, Wan 2.1 / Movie Gen): `x_t = (1 - t) x0 + t eps`, target `eps - x0`, logit-normal times
shifted by `objective.shift`, timestep `1000 t`, first-order Euler from t = 1 to 0 (`ttm_jax.diffusion.flow`,
`ttm_jax.diffusion.samplers`).

`ddim_v` (the paper's U-Net, AnimateDiff): DDPM betas (`scaled_linear`) rescaled to zero terminal SNR, v-prediction,
integer timesteps drawn uniformly from 0..T-1 (or, with `objective.shift` s != 1, the level u ~ U[0, 1) shifted to
`s u / (1 + (s - 1) u)` and floored: training at high noise; the model takes them as they are), deterministic DDIM over
`trailing` timesteps (`ttm_jax.diffusion.ddim`; equal to diffusers' `DDIMScheduler(rescale_betas_zero_snr=True,
timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False)`). Its sampling grid is its own
(`objective.timestep_spacing`): the flow schedules' names and shift do not apply to its sampling.

A new objective is a class with these methods, registered in `OBJECTIVES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np

from ttm_jax.assembly.registry import Registry
from ttm_jax.diffusion import ddim, flow, samplers


class Objective(Protocol):
    name: str

    def sample_time(self, rng: jax.Array, batch_size: int) -> jax.Array: ...

    def noisy(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array: ...

    def target(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array: ...

    def loss(self, pred: jax.Array, target: jax.Array, t: jax.Array) -> jax.Array: ...

    def model_time(self, t: jax.Array) -> jax.Array: ...

    def time_grid(self, num_steps: int, schedule: str, shift: float = 1.0) -> np.ndarray: ...

    def sample(self, model_fn: Callable[..., jax.Array], noise: jax.Array, ts: jax.Array, *args: Any,
               self_condition: bool = False) -> jax.Array: ...

    def clean_estimate(self, x: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array: ...

    def time_at(self, level: float) -> float: ...


class RectifiedFlow:
    """Rectified flow (module docstring); `objective` is `config.objective` (t_sampling, logit_mean/std, shift)."""

    name = "rectified_flow"

    def __init__(self, objective: ml_collections.ConfigDict):
        self.config = objective

    def sample_time(self, rng: jax.Array, batch_size: int) -> jax.Array:
        """float32 `[B]` in (0, 1)."""
        return flow.sample_time(rng, batch_size, self.config)

    def noisy(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        return flow.interpolate(x0, eps, t)

    def target(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        del t  # the velocity of a straight path is constant along it
        return flow.velocity_target(x0, eps)

    def loss(self, pred: jax.Array, target: jax.Array, t: jax.Array) -> jax.Array:
        """Unweighted MSE (rectified flow weighs every time alike); `t [B]` is there for objectives that weigh by
        time (e.g. SNR weighting)."""
        del t
        return flow.loss(pred, target)

    def model_time(self, t: jax.Array) -> jax.Array:
        return flow.wan_timestep(t)

    def time_grid(self, num_steps: int, schedule: str, shift: float = 1.0) -> np.ndarray:
        return samplers.time_grid(int(num_steps), schedule, shift=float(shift))

    def sample(self, model_fn: Callable[..., jax.Array], noise: jax.Array, ts: jax.Array, *args: Any,
               self_condition: bool = False) -> jax.Array:
        """Euler along the predicted velocity from `ts[0]` to `ts[-1]`; `model_fn(x, t [B], *args) -> v` (with
        `self_condition`, `x` carries the previous clean estimate too: `samplers.euler_sample`)."""
        return samplers.euler_sample(model_fn, noise, ts, *args, self_condition=self_condition)

    def clean_estimate(self, x: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array:
        """`x_t - t v`: the end of the straight path the velocity `pred` points along."""
        return flow.clean_from_velocity(x, pred, t)

    def time_at(self, level: float) -> float:
        return float(level)


class DDIMVPrediction:
    """DDPM with zero terminal SNR, v-prediction, DDIM sampling (module docstring); `objective` is `config.objective`
    (num_train_timesteps, beta_start, beta_end, beta_schedule, rescale_zero_terminal_snr, timestep_spacing)."""

    name = "ddim_v"

    def __init__(self, objective: ml_collections.ConfigDict):
        self.config = objective
        self.num_train_timesteps = int(objective.num_train_timesteps)
        self.alphas_cumprod = ddim.alphas_cumprod(
            num_train_timesteps=self.num_train_timesteps, beta_start=float(objective.beta_start),
            beta_end=float(objective.beta_end),
            schedule=objective.beta_schedule,
            rescale_zero_terminal_snr=bool(objective.rescale_zero_terminal_snr))
        self.spacing = objective.timestep_spacing

    def sample_time(self, rng: jax.Array, batch_size: int) -> jax.Array:
        """Integer timesteps in [0, T) as float32 `[B]`: uniform, or with `objective.shift = s != 1` the uniform
        level `u` shifted to `s u / (1 + (s - 1) u)` (as the flow's times) and floored to a timestep, so that more
        training falls at the high noise where a trajectory's layout is decided."""
        shift = float(self.config.shift)
        if shift == 1.0:  # the same draws as before the shift existed
            return jax.random.randint(rng, (batch_size,), 0, self.num_train_timesteps).astype(jax.numpy.float32)
        u = jax.random.uniform(rng, (batch_size,), jax.numpy.float32)
        level = shift * u / (1.0 + (shift - 1.0) * u)
        t = jax.numpy.floor(level * self.num_train_timesteps)
        return jax.numpy.clip(t, 0, self.num_train_timesteps - 1).astype(jax.numpy.float32)

    def noisy(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        return ddim.add_noise(x0, eps, ddim.gather(self.alphas_cumprod, t))

    def target(self, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        return ddim.velocity(x0, eps, ddim.gather(self.alphas_cumprod, t))

    def loss(self, pred: jax.Array, target: jax.Array, t: jax.Array) -> jax.Array:
        """Unweighted MSE on v."""
        del t
        return flow.loss(pred, target)

    def model_time(self, t: jax.Array) -> jax.Array:
        return t

    def time_grid(self, num_steps: int, schedule: str = "", shift: float = 1.0) -> np.ndarray:
        """Descending timesteps float32 `[num_steps]` (`objective.timestep_spacing`; `schedule`/`shift` are the flow
        grids' and are not used)."""
        del schedule, shift
        return ddim.timesteps(int(num_steps), self.num_train_timesteps, self.spacing).astype(np.float32)

    def sample(self, model_fn: Callable[..., jax.Array], noise: jax.Array, ts: jax.Array, *args: Any,
               self_condition: bool = False) -> jax.Array:
        """DDIM (eta = 0) over `ts` (from `time_grid`); `model_fn(x, t [B], *args) -> v` (with `self_condition`,
        `x` carries the previous clean estimate too: `ddim.ddim_sample`)."""
        a_t, a_prev = ddim.step_alphas(ts, self.alphas_cumprod, self.num_train_timesteps)
        return ddim.ddim_sample(model_fn, noise, ts, a_t, a_prev, *args, self_condition=self_condition)

    def clean_estimate(self, x: jax.Array, pred: jax.Array, t: jax.Array) -> jax.Array:
        """`sqrt(a) x_t - sqrt(1 - a) v` at timesteps `t [B]`."""
        return ddim.clean_from_velocity(x, pred, ddim.gather(self.alphas_cumprod, t))

    def time_at(self, level: float) -> float:
        """The timestep `round(level (T - 1))`: level 1 is the last (pure noise under zero terminal SNR)."""
        return float(round(float(level) * (self.num_train_timesteps - 1)))


OBJECTIVES: Registry[Callable[[ml_collections.ConfigDict], Objective]] = Registry("objective.name")
OBJECTIVES.register("rectified_flow", RectifiedFlow)
OBJECTIVES.register("ddim_v", DDIMVPrediction)


def sample(objective: Objective, model_fn: Callable[..., jax.Array], noise: jax.Array, ts: jax.Array, *args: Any,
           self_condition: bool = False) -> jax.Array:
    """`objective.sample(...)`, passing `self_condition` only when set (`config.model.self_condition`), so an
    objective registered without self-conditioning still samples models that do not use it."""
    if self_condition:
        check_self_condition(objective)
        return objective.sample(model_fn, noise, ts, *args, self_condition=True)
    return objective.sample(model_fn, noise, ts, *args)


def check_self_condition(objective: Objective) -> None:
    """Raises (naming the fix) when `objective.sample` has no `self_condition` argument: a model trained with
    `config.model.self_condition` could not be sampled with it. The training loop checks before its first step."""
    if "self_condition" not in inspect.signature(objective.sample).parameters:
        raise ValueError(f"config.model.self_condition: the objective {objective.name!r} samples without "
                         f"self-conditioning (its sample() takes no self_condition argument); set "
                         f"model.self_condition=False or choose one of rectified_flow, ddim_v")


def make_objective(objective: ml_collections.ConfigDict) -> Objective:
    """The objective `config.objective.name` names (pass `config.objective`; default `rectified_flow`, for configs
    saved before the field existed)."""
    return OBJECTIVES.get(objective.name)(objective)
