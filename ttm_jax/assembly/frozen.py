"""The frozen inputs of a stage: the text encoder's params and the empty prompt's embeddings (what dropped text
becomes), placed in their shardings. Training and sampling both call `init_frozen`, so the null text a sampled model
sees is the one it was trained with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ttm_jax.assembly import registry
from ttm_jax.assembly.inputs import encode_text
from ttm_jax.assembly.modules import Modules
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import compile as compile_lib
from ttm_jax.runtime import sharding as sharding_lib


def init_frozen(config: ml_collections.ConfigDict, modules: Modules, mesh: jax.sharding.Mesh,
                rules: sharding_lib.Rules) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text encoder params (converted weights from `config.text_encoder.path`, or random from `config.seed`) and
    the empty prompt's embeddings `[1, Lc, d]`, `[1, Lp, d]` with its local mask `[1, Lp]`. Returns `(frozen,
    shardings)`; cached per config, modules and mesh in this process."""
    key = compile_lib.cache_key(config, modules, mesh, "frozen", rules)
    return compile_lib.cached(key, lambda: _init_frozen(config, modules, mesh, rules))


def _init_frozen(config, modules, mesh, rules):
    t = config.text_encoder
    ids, mask = modules.tokenizer.encode([""], int(t.max_length))
    lids, lmask = modules.tokenizer.encode([""], int(t.local_max_length))
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x7E47)
    options = compile_lib.compiler_options(config)

    def init_te(r):
        return modules.text_encoder.init(r, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))["params"]

    if t.get("path", ""):
        te_params, te_sh = load_text_encoder(config, init_te, rng, mesh, rules)
    else:
        te_params, te_sh = sharding_lib.init_sharded(init_te, rng, mesh=mesh, rules=rules, compiler_options=options)
    rep = sharding_lib.replicated(mesh)

    def empties(te):
        return (encode_text(modules, te, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)),
                encode_text(modules, te, jnp.asarray(lids, jnp.int32), jnp.asarray(lmask, bool)))

    empty, empty_local = compile_lib.call(jax.jit(empties, out_shardings=(rep, rep)), options, te_params)
    frozen = {"text_encoder": te_params, "empty_context": empty, "empty_local_context": empty_local,
              "empty_local_mask": jax.device_put(np.asarray(lmask, bool), rep)}
    shardings = {"text_encoder": te_sh, "empty_context": rep, "empty_local_context": rep, "empty_local_mask": rep}
    return frozen, shardings


def load_text_encoder(config: ml_collections.ConfigDict, init_te: Callable, rng: jax.Array,
                      mesh: jax.sharding.Mesh, rules: sharding_lib.Rules) -> tuple[Any, Any]:
    """Converted text-encoder weights at `config.text_encoder.path`, placed in their shardings: a folder the
    registered encoder converts on the fly (transformers, `registry.TEXT_ENCODERS`) or an Orbax checkpoint of
    converted params."""
    path = config.text_encoder.path
    entry = registry.text_encoder(config)
    abstract = jax.eval_shape(init_te, rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
    if entry.is_source_folder(path):
        host = entry.load(config.text_encoder, path)
        return jax.tree.map(lambda x, sh: jax.device_put(np.asarray(x), sh), host, shardings), shardings
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          sharding_lib.unbox(abstract), shardings)
    params = checkpoint_lib.restore_tree(path, target, field="config.text_encoder.path",
                                         fix="it must be a transformers encoder folder or an Orbax checkpoint of "
                                             "converted params of this encoder's shapes")
    return params, shardings
