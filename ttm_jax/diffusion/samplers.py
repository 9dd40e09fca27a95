"""Flow-matching samplers: time grids and a jitted first-order Euler loop, sharded over the batch.

Convention (DESIGN.md, rectified flow): `x_t = (1 - t) x0 + t eps`, the model predicts the velocity
`v = dx_t/dt = eps - x0`, and sampling integrates the ODE from `t = 1` (pure noise) down to `t = 0` (data).
An Euler step from `t` to `t_next < t` is `x <- x + (t_next - t) v(x, t)`.

Time grids (`time_grid`) are `num_steps + 1` descending values from 1 to 0:

- `uniform`: `t_k = 1 - k / N`.
- `linear_quadratic` (Movie Gen, section 3.1.2; the same definition as genmo's Mochi release): the first
  `L = N // 2` steps follow the first steps of a fine linear schedule, descending `t` by `threshold / L` per step down
  to `1 - threshold` (Movie Gen: 25 of 50 steps cover the first 25 of 1000 linear steps, `threshold = 0.025`); the
  remaining `N - L` steps cover the rest with a quadratic in the step index, chosen so the curve reaches `t = 0` at step
  `N` and its slope is continuous at step `L`. Most of the steps are thus spent near `t = 1`, where the coarse layout
  is decided.

An optional `shift` re-maps every grid value by `t' = s t / (1 + (s - 1) t)` (the SD3 / Wan time shift); `1.0` keeps
the grid as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttm_jax.diffusion import flow

SCHEDULES = ("linear_quadratic", "uniform")

# x [B, ...], t [B] (float32 in [0, 1]), *args -> v [B, ...]
VelocityFn = Callable[..., jax.Array]


def linear_quadratic_progress(num_steps: int, threshold: float = 0.025, linear_steps: int | None = None) -> np.ndarray:
    """Progress `1 - t` of Movie Gen's linear-quadratic schedule at steps `0..N`: float64 `[N + 1]`, 0 -> 1.

    Steps `k <= L` are linear, `k * threshold / L`; steps `L..N` follow the quadratic `a k^2 + b k + c` fixed by three
    conditions: value `threshold` and slope `threshold / L` at `k = L` (continuity of value and slope) and value 1 at
    `k = N`.
    """
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"samplers.linear_quadratic_progress: num_steps={num_steps} must be >= 1")
    if n == 1:
        return np.array([0.0, 1.0])
    lin = n // 2 if linear_steps is None else int(linear_steps)
    if not 1 <= lin < n:
        raise ValueError(f"samplers.linear_quadratic_progress: linear_steps={linear_steps} must be in [1, {n - 1}]")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"samplers.linear_quadratic_progress: threshold={threshold} must be in (0, 1)")
    k = np.arange(n + 1, dtype=np.float64)
    slope = threshold / lin
    # f(k) = threshold + slope (k - L) + a (k - L)^2 with f(N) = 1.
    q = n - lin
    a = (1.0 - threshold - slope * q) / q**2
    quad = threshold + slope * (k - lin) + a * (k - lin) ** 2
    out = np.where(k <= lin, k * slope, quad)
    out[-1] = 1.0
    return out


def shift_time(t: np.ndarray, shift: float) -> np.ndarray:
    """The SD3 / Wan time shift `s t / (1 + (s - 1) t)`; identity for `shift == 1`."""
    if shift <= 0:
        raise ValueError(f"samplers.shift_time: shift={shift} must be > 0")
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(
    num_steps: int,
    schedule: str = "linear_quadratic",
    *,
    threshold: float = 0.025,
    linear_steps: int | None = None,
    shift: float = 1.0,
) -> np.ndarray:
    """Descending sampling times: float32 `[num_steps + 1]`, `t[0] = 1` (noise) ... `t[N] = 0` (data)."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"samplers.time_grid: num_steps={num_steps!r} must be a positive int "
                         f"(config.sample.num_steps)")
    if schedule == "uniform":
        t = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
    elif schedule == "linear_quadratic":
        t = 1.0 - linear_quadratic_progress(num_steps, threshold, linear_steps)
    else:
        raise ValueError(f"samplers.time_grid: schedule={schedule!r}; choose one of {SCHEDULES} "
                         f"(config.sample.schedule)")
    t = shift_time(t, shift)
    t[0], t[-1] = 1.0, 0.0
    return t.astype(np.float32)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, ts: jax.Array, *args: Any,
                 self_condition: bool = False) -> jax.Array:
    """First-order Euler from `ts[0]` to `ts[-1]` with `lax.fori_loop`; traceable, wrap in `jit` (`make_sampler`).

    Args:
      velocity_fn: `(x [B, ...], t [B], *args) -> v [B, ...]`, with `t` in [0, 1] (scale it to the model's units
        inside, e.g. x1000 for Wan).
      noise: `x` at `ts[0]`, `[B, ...]` (standard normal for `ts[0] = 1`).
      ts: float `[N + 1]` descending times (`time_grid`).
      *args: pytrees passed through to `velocity_fn` (parameters, conditions): traced, never baked in as constants.
      self_condition: `velocity_fn` takes `[x, x0_prev]` concatenated on the channels, the previous step's clean
        estimate `x - t v` (zeros at the first step).
    Returns:
      `x` at `ts[-1]`, `[B, ...]`, in `noise.dtype`.
    """
    ts = jnp.asarray(ts, jnp.float32)
    batch = noise.shape[0]

    def body(i, carry):
        x, x0_prev = carry
        t, t_next = ts[i], ts[i + 1]
        inp = jnp.concatenate([x, x0_prev.astype(x.dtype)], axis=-1) if self_condition else x
        v = velocity_fn(inp, jnp.full((batch,), t, jnp.float32), *args)
        x0 = (flow.clean_from_velocity(x.astype(jnp.float32), v.astype(jnp.float32), jnp.full((batch,), t))
              if self_condition else x0_prev)
        # integrate in float32 whatever the model's compute dtype, as diffusers' flow-matching scheduler does
        return (x.astype(jnp.float32) + (t_next - t) * v.astype(jnp.float32)).astype(noise.dtype), x0

    init = (noise, jnp.zeros(noise.shape, jnp.float32) if self_condition else jnp.zeros((), jnp.float32))
    return jax.lax.fori_loop(0, ts.shape[0] - 1, body, init)[0]


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Leading (batch) dimension split over `batch_axes` of `mesh` (those present), the rest replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def shard_batch(tree: Any, mesh: Mesh, batch_axes: Sequence[str] = ("data", "fsdp")) -> Any:
    """`device_put` every array of `tree` with its leading dimension split over the mesh's batch axes.

    Raises a ValueError naming the leaf when a batch size is not divisible by the number of batch shards.
    """
    sharding = batch_sharding(mesh, batch_axes)
    shards = int(np.prod([mesh.shape[a] for a in batch_axes if a in mesh.axis_names]))

    def put(path, x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % shards:
            raise ValueError(
                f"samplers.shard_batch: {jax.tree_util.keystr(path) or 'array'} has shape {x.shape}, whose leading "
                f"(batch) size is not divisible by the {shards} batch shards of the mesh {dict(mesh.shape)}; pad the "
                f"batch (inference/pipeline.py pads requests) or use fewer devices")
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(put, tree)


def make_sampler(
    velocity_fn: VelocityFn,
    *,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
) -> Callable[..., jax.Array]:
    """A jitted `(noise [B, ...], ts [N + 1], *args) -> x0 [B, ...]` Euler sampler.

    With a `mesh`, the noise and the result are split over the batch on `batch_axes` (put the batch-leading
    conditions in `args` through `shard_batch`, and the parameters with their training sharding or replicated); XLA
    partitions the loop accordingly, one shard of the batch per device group. `ts` is an argument, so changing the
    schedule with the same step count reuses the compiled function.
    """
    if mesh is None:
        return jax.jit(lambda noise, ts, *args: euler_sample(velocity_fn, noise, ts, *args))
    sharding = batch_sharding(mesh, batch_axes)
    fn = jax.jit(
        lambda noise, ts, *args: euler_sample(velocity_fn, jax.lax.with_sharding_constraint(noise, sharding), ts,
                                              *args),
        out_shardings=sharding,
    )
    return fn
