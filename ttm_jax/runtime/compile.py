"""Compiling with XLA options, in one place, and a per-process cache of compiled functions.

`config.train.compiler_options` (e.g. `{"xla_backend_optimization_level": 0}`, several-fold faster CPU compiles for
tests and debugging) are applied by lowering and compiling ahead of time; without options a `jax.jit` function is
simply called. `cached(key, build)` keeps compiled functions across calls in one process (tests, notebooks, sweeps):
`jax.jit` caches per function object, so rebuilding the closure would recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

_CACHE: dict[tuple, Any] = {}


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """`config.train.compiler_options` as XLA options for `Lowered.compile`; None when empty."""
    opts = config.train.compiler_options
    if not opts:
        return None
    return dict(opts.to_dict() if isinstance(opts, ml_collections.ConfigDict) else opts)


def call(fn: Callable, options: dict[str, Any] | None, *args: Any) -> Any:
    """Call the `jax.jit`-wrapped `fn` on `args`, compiled with `options` when given (compiled anew each call: for
    functions called once, e.g. an init)."""
    if not options:
        return fn(*args)
    return fn.lower(*args).compile(compiler_options=options)(*args)


def compile_once(fn: Callable, options: dict[str, Any] | None) -> Callable:
    """`fn` (`jax.jit`-wrapped) as a callable that, with `options`, compiles ahead of time on its first call and reuses
    that executable (for functions whose argument shapes never change, e.g. the train step). `.jitted` is `fn`."""
    compiled: list[Any] = []

    def run(*args):
        if not options:
            return fn(*args)
        if not compiled:
            compiled.append(fn.lower(*args).compile(compiler_options=options))
        return compiled[0](*args)

    run.jitted = fn  # for `.lower(...)` (memory analysis in bench/)
    return run


def cache_key(config: ml_collections.ConfigDict, modules: Any, mesh: jax.sharding.Mesh, *extra: Any) -> tuple:
    """Everything a compiled function depends on; `train` fields that only bound or log a run are left out (the XLA
    options are kept), except `total_steps` when a cooldown (`optim.cooldown_steps` or `cooldown_fraction`) makes the
    learning rate depend on it.
    `modules` enters by identity: every cached function closes over the modules it was built from, so they stay alive
    with the entry and their id cannot be reused while it exists."""
    c = config.to_dict()
    kept = ("batch_size", "grad_accum_steps", "compiler_options")
    if c.get("optim", {}).get("cooldown_steps", 0) or c.get("optim", {}).get("cooldown_fraction", 0):
        kept += ("total_steps",)  # the schedule's cooldown starts at total_steps - cooldown_steps
    c["train"] = {k: c["train"].get(k) for k in kept}
    return (repr(sorted(c.items())), id(modules), tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()),
            *map(repr, extra))


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """`build()` once per `key` per process."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached compiled function (e.g. between sweeps in one process)."""
    _CACHE.clear()
