"""The frozen inputs of a stage: the text encoder's params and the empty prompt's embeddings (what dropped text
becomes), placed in their shardings. Training and sampling both call `init_frozen`, so the null text a sampled model
sees is the one it was trained with. With cached text (`config.data.cached`, `init_frozen(..., cached=True)`) the
text encoder is not loaded: the empty prompt's embeddings come from the encoded folder (`data/encode`), made there
by the same encoder. `make_encoders` is the frozen encoders as the encoding program (`python -m
ttm_jax.data.encode`) runs them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ttm_jax.assembly import registry
from ttm_jax.assembly.inputs import encode_text, to_unit_range
from ttm_jax.assembly.modules import Modules, build_modules
from ttm_jax.data import encode as encode_lib
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.runtime import compile as compile_lib
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib


def init_frozen(config: ml_collections.ConfigDict, modules: Modules, mesh: jax.sharding.Mesh,
                rules: sharding_lib.Rules, *, cached: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The text encoder params (converted weights from `config.text_encoder.path`, or random from `config.seed`) and
    the empty prompt's embeddings `[1, Lc, d]`, `[1, Lp, d]` with its local mask `[1, Lp]`. Returns `(frozen,
    shardings)`; cached per config, modules and mesh in this process.

    `cached` (training with `config.data.cached`): no text encoder; the empty prompt's embeddings are read from the
    encoded folder `config.data.prepared_path` (`data/encode`'s `empty_text.npz`)."""
    key = compile_lib.cache_key(config, modules, mesh, "frozen", rules, cached)
    if cached:
        return compile_lib.cached(key, lambda: _cached_frozen(config, mesh))
    return compile_lib.cached(key, lambda: _init_frozen(config, modules, mesh, rules))


def _cached_frozen(config, mesh):
    path = config.data.prepared_path
    empty = encode_lib.read_empty_text(path)
    t = config.text_encoder
    want = {"empty_context": (1, int(t.max_length), int(t.d_model)),
            "empty_local_context": (1, int(t.local_max_length), int(t.d_model)),
            "empty_local_mask": (1, int(t.local_max_length))}
    for k, shape in want.items():
        if tuple(empty[k].shape) != shape:
            raise ValueError(f"{path}/{encode_lib.EMPTY_TEXT}: {k} has shape {empty[k].shape}, config.text_encoder "
                             f"gives {shape}; encode again with this config (python -m ttm_jax.data.encode)")
    rep = sharding_lib.replicated(mesh)
    frozen = {k: jax.device_put(empty[k], rep) for k in encode_lib.EMPTY_KEYS}
    return frozen, {k: rep for k in encode_lib.EMPTY_KEYS}


def encoding_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
                  ) -> jax.sharding.Mesh:
    """The mesh of the encoding program: this process' devices on the `fsdp` axis (the text encoder's parameters
    sharded by the training rules, the batch split over every device)."""
    devices = list(jax.local_devices() if devices is None else devices)
    shape = ml_collections.ConfigDict({"data": 1, "fsdp": len(devices), "tensor": 1})
    return mesh_lib.make_mesh(ml_collections.ConfigDict({"shape": shape}), devices)


def _per_shape(jitted: Any, options: dict[str, Any] | None) -> Callable[..., Any]:
    """`jitted` compiled with the config's XLA options once per shapes of the last argument(s) (the batch; the first
    argument, parameters, never changes shape)."""
    compiled: dict[Any, Any] = {}

    def call(*args):
        key = tuple((tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", ""))) for a in args[-2:])
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile(compiler_options=options) if options else jitted
        return compiled[key](*args)

    return call


def make_encoders(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                  modules: Modules | None = None) -> encode_lib.Encoders:
    """The run's frozen encoders as `data/encode` runs them on `mesh` (`encoding_mesh`): the autoencoder's encoder
    on uint8 videos (its `encode_with(params, ...)` where it has one, e.g. the Wan VAE in its time chunks) and the
    text encoder of `init_frozen` (`encode_text`: padding zeroed), jitted; the loader's tokenizer; the empty prompt's
    embeddings."""
    modules = modules or build_modules(config)
    rules = sharding_lib.rules_from_config(config.mesh)
    frozen, _ = init_frozen(config, modules, mesh, rules)
    ae = modules.autoencoder
    options = compile_lib.compiler_options(config)
    if hasattr(ae, "encode_with"):
        params = jax.device_put(ae.params, sharding_lib.replicated(mesh))
        encode_ae = _per_shape(jax.jit(lambda p, v: ae.encode_with(p, to_unit_range(v)).astype(jnp.float32)), options)

        def latents(video):
            return encode_ae(params, video)
    else:
        encode_plain = _per_shape(jax.jit(lambda v: ae.encode(to_unit_range(v)).astype(jnp.float32)), options)

        def latents(video):
            return encode_plain(video)

    te = frozen["text_encoder"]
    encode_te = _per_shape(jax.jit(lambda p, ids, mask: encode_text(modules, p, ids, mask).astype(jnp.float32)),
                           options)

    def text(ids, mask):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return encode_te(te, ids, mask)

    empty = {k: frozen[k] for k in encode_lib.EMPTY_KEYS}
    return encode_lib.Encoders(latents=latents, text=text, tokenizer=modules.tokenizer, empty=empty, mesh=mesh)


def _init_frozen(config, modules, mesh, rules):
    t = config.text_encoder
    ids, mask = modules.tokenizer.encode([""], int(t.max_length))
    lids, lmask = modules.tokenizer.encode([""], int(t.local_max_length))
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x7E47)
    options = compile_lib.compiler_options(config)

    def init_te(r):
        return modules.text_encoder.init(r, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))["params"]

    if t.path:
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
