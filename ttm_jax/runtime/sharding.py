"""Logical axis names -> mesh axes -> `NamedSharding`s; parameters born sharded.

Models name the axes of their parameters and activations (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`; names in CONTRIBUTING.md). `config.mesh.rules` is one ordered table mapping each logical
name to mesh axes (MaxText's scheme): a name takes its mesh axes only if they are still free in that array, so
`batch -> (data, fsdp)` first and `embed -> (fsdp, context)` later shards a parameter's `embed` dimension over fsdp
and the context axis (as MaxText: the devices that split the sequence also hold a share of the weights) while an
activation `[batch, length, embed]` keeps `embed` whole.

A dimension that the mesh axes do not divide stays unsharded (e.g. 3 output channels over fsdp=4), so any model
shape runs on any mesh. Parameters without logical names (`config.mesh.shard_unannotated`) are sharded over fsdp (x
context) on their largest divisible dimension once they have at least `min_shard_size` elements, else replicated.

Parameters are born sharded: `jax.eval_shape(init)` gives shapes and logical names without spending memory, and
`jax.jit(init, out_shardings=...)` writes each device's shard directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ttm_jax.runtime import compile as compile_lib
from ttm_jax.runtime import mesh as mesh_lib

Rules = tuple[tuple[str, Any], ...]

def rules_from_config(mesh_config: ml_collections.ConfigDict) -> Rules:
    """`config.mesh.rules` (the one table, `ttm_jax/config.py`; order is priority) as a tuple of (logical name, mesh
    axes or None); checks mesh axis names."""
    if "rules" not in mesh_config:
        raise ValueError("config.mesh.rules: missing; it maps logical axis names to mesh axes (see ttm_jax/config.py, "
                         "the mesh section), e.g. (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ...)")
    raw = mesh_config.rules
    out = []
    for i, rule in enumerate(raw):
        if len(rule) != 2:
            raise ValueError(f"config.mesh.rules[{i}]: {rule!r} must be a (logical_name, mesh_axes) pair")
        name, axes = rule
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        bad = [a for a in names if a not in mesh_lib.MESH_AXES]
        if bad:
            raise ValueError(f"config.mesh.rules[{i}]: {name!r} -> {bad} are not mesh axes {mesh_lib.MESH_AXES}")
        out.append((str(name), None if not names else (names[0] if len(names) == 1 else names)))
    return tuple(out)


def _axes_size(mesh: jax.sharding.Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """`spec` with the mesh axes dropped from every dimension they do not divide. In a tuple of axes, the `context`
    axis at size 1 is dropped too: parameters shard over `(fsdp, context)`, and a mesh without context parallelism
    then shards (and records in its checkpoints) exactly what `fsdp` alone did."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        if isinstance(axes, tuple) and "context" in axes and mesh.shape.get("context", 1) == 1:
            axes = tuple(a for a in axes if a != "context")
            axes = None if not axes else (axes[0] if len(axes) == 1 else axes)
        if axes is not None and dim % _axes_size(mesh, axes):
            names = (axes,) if isinstance(axes, str) else tuple(axes)
            # keep the longest prefix of the axes that still divides (e.g. ("data", "fsdp") -> "data")
            axes = None
            for k in range(len(names) - 1, 0, -1):
                if dim % _axes_size(mesh, names[:k]) == 0:
                    axes = names[:k] if k > 1 else names[0]
                    break
        out.append(axes)
    return PartitionSpec(*out)


def logical_to_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                        rules: Rules) -> NamedSharding:
    """The `NamedSharding` of one array with logical axis names `logical` (one per dimension)."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def _fallback_spec(shape: Sequence[int], mesh: jax.sharding.Mesh, min_size: int) -> PartitionSpec:
    # over fsdp x context (as the `embed` rule) where that divides the largest dimension, else over fsdp alone
    candidates = [("fsdp", "context"), "fsdp"] if mesh.shape.get("context", 1) > 1 else ["fsdp"]
    if len(shape) < 2 or math.prod(shape) < min_size:
        return PartitionSpec()
    for axes in candidates:
        n = _axes_size(mesh, axes)
        if n == 1:
            continue
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[i] % n == 0:
                return PartitionSpec(*[(axes if j == i else None) for j in range(len(shape))])
    return PartitionSpec()


def tree_shardings(abstract_boxed: Any, mesh: jax.sharding.Mesh, rules: Rules, *, shard_unannotated: bool = True,
                   min_shard_size: int = 2**14) -> Any:
    """Shardings for a (possibly `nn.LogicallyPartitioned`-boxed) abstract tree, in the *unboxed* structure."""

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            value = leaf.value
            names = leaf.names
            if isinstance(leaf, nn.LogicallyPartitioned):
                return logical_to_sharding(names, value.shape, mesh, rules)
            return NamedSharding(mesh, fit_spec(PartitionSpec(*names), value.shape, mesh))
        shape = np.shape(leaf)
        if shard_unannotated:
            return NamedSharding(mesh, _fallback_spec(shape, mesh, min_shard_size))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def like_params(tree: Any, params_treedef: Any, param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a tree that contains copies of the params tree (optimizer moments, EMA): every subtree with the
    params' structure gets the params' shardings; every other leaf (step counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_params(x):
        try:
            return jax.tree.structure(x) == params_treedef and jax.tree.leaves(x) != []
        except Exception:  # noqa: BLE001 - exotic nodes are simply not params-shaped
            return False

    def one(x):
        if is_params(x):
            return param_shardings
        return replicated

    return jax.tree.map(one, tree, is_leaf=is_params)


def unbox(tree: Any) -> Any:
    """Strip `nn.Partitioned` boxes."""
    return nn.meta.unbox(tree)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(mesh_lib.batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def init_sharded(init_fn: Callable[..., Any], *args: Any, mesh: jax.sharding.Mesh, rules: Rules,
                 shard_unannotated: bool = True, compiler_options: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Run `init_fn(*args)` (returning a possibly boxed tree) so that each output is created in its sharding.

    Returns `(unboxed tree, its shardings)`. Shapes and logical names come from `jax.eval_shape` first.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh, rules, shard_unannotated=shard_unannotated)
    fn = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=shardings)
    return compile_lib.call(fn, compiler_options, *args), shardings


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` (of jax.Arrays) held by the most loaded device."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values()) if per else 0
