"""The trained model's parameters: its init function (from the backbone's init inputs) and their shardings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from ttm_jax.assembly import registry
from ttm_jax.assembly.modules import Modules
from ttm_jax.runtime import sharding as sharding_lib


def make_init_params(config: ml_collections.ConfigDict, modules: Modules) -> Callable[[jax.Array], Any]:
    """`rng -> boxed params` of the trained model (logical axis names kept for the sharding rules)."""
    args, kwargs = registry.init_inputs(config)

    def init_params(rng):
        return modules.model.init(rng, *args, **kwargs)["params"]

    return init_params


def param_shardings(config: ml_collections.ConfigDict, modules: Modules, mesh: jax.sharding.Mesh,
                    rules: sharding_lib.Rules) -> Any:
    """`NamedSharding`s of the (unboxed) params, as training places them (`config.mesh.shard_unannotated`)."""
    init_params = make_init_params(config, modules)
    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(int(config.seed)))
    return sharding_lib.tree_shardings(abstract, mesh, rules,
                                       shard_unannotated=bool(config.mesh.shard_unannotated))
