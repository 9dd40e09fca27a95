"""The jitted train step: `(state, frozen, batch) -> (state, metrics)`.

One step:
  1. the step's RNG is `fold_in(PRNGKey(config.seed), state.step)`; noise, times and dropout are drawn from it for
     the whole global batch before any split (`draw`), so a resumed run, any mesh and any accumulation split see
     exactly the same values per example;
  2. latents: the batch's cached `video_latent`/`trajectory_latent` when present, else the frozen autoencoder on the
     uint8 videos (mapped to [-1, 1]); text: the frozen text encoder on the token ids (padding rows zeroed);
  3. the stage's target and conditions (DESIGN.md):
       stage 1  target E(trajectory); conditions E(x0), E(s0) (first frames); text = motion prompt
       stage 2  target E(video);      conditions E(x0), E(trajectory);        text = caption, plus local prompts and
                per-token object ids for the added masked layers (`config.model.cross_ids_from`: bbox | mask)
  4. rectified flow (`ttm_jax.diffusion.flow`): x_t, the velocity target, the condition dropout;
  5. gradients averaged over `train.grad_accum_steps` micro-batches (`lax.scan`; micro-batch i takes examples
     i, i+A, i+2A, ..., so each device keeps working on its own rows), one optimizer update.
The state is donated; in/out shardings are explicit (`state_shardings`, batch split over data x fsdp).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ttm_jax import config as config_lib
from ttm_jax.diffusion import flow
from ttm_jax.runtime import mesh as mesh_lib
from ttm_jax.runtime import sharding as sharding_lib
from ttm_jax.train import state as state_lib

# Batch keys the step reads (CONTRIBUTING.md "Batches"); anything else in a batch is ignored.
BATCH_KEYS = ("video", "trajectory", "object_masks", "num_objects", "caption_tokens", "caption_mask",
              "motion_tokens", "motion_mask", "local_tokens", "local_mask", "video_latent", "trajectory_latent")


@dataclasses.dataclass(frozen=True)
class Modules:
    """What a run trains and what it keeps frozen.

    model: Flax module, `DiT(config.model, in_channels, out_channels)`'s call signature (CONTRIBUTING.md).
    text_encoder: Flax module `(ids [B, L] int32, mask [B, L] bool) -> [B, L, text_dim]` (frozen).
    autoencoder: `encode(video [B,T,H,W,3] in [-1,1]) -> [B,T',H',W',C]`, `decode`, `time_factor`, `space_factor`.
    tokenizer: `encode(texts, max_length) -> (ids, mask)`; only the empty prompt is tokenized here.
    """

    model: nn.Module
    text_encoder: nn.Module
    autoencoder: Any
    tokenizer: Any


def build_modules(config: ml_collections.ConfigDict) -> Modules:
    """The real modules named by the config (imported here so `train` imports nothing heavy at module load)."""
    from ttm_jax.models import autoencoder as autoencoder_lib
    from ttm_jax.models import dit as dit_lib
    from ttm_jax.models import text_encoder as text_encoder_lib
    from ttm_jax.models import tokenizer as tokenizer_lib

    c = config.autoencoder.latent_channels
    return Modules(
        model=dit_lib.DiT(config.model, config_lib.in_channels(config), c),
        text_encoder=text_encoder_lib.T5Encoder(config.text_encoder),
        autoencoder=autoencoder_lib.make_autoencoder(config.autoencoder),
        tokenizer=tokenizer_lib.make_tokenizer(config.text_encoder),
    )


def _stage_input(stage: int, noisy: jax.Array, first: jax.Array, cond: jax.Array) -> jax.Array:
    from ttm_jax.models import conditioning

    return conditioning.stage_input(stage, noisy, first, cond)


def to_unit_range(video: jax.Array) -> jax.Array:
    """uint8 `[..., 3]` -> float32 in [-1, 1]."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def encode_text(modules: Modules, te_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Frozen text embeddings `[B, L, d]`, padding positions zeroed (as Wan feeds umT5 outputs)."""
    emb = modules.text_encoder.apply({"params": te_params}, ids, mask.astype(bool))
    emb = emb * mask[..., None].astype(emb.dtype)
    return jax.lax.stop_gradient(emb)


def prepare(config: ml_collections.ConfigDict, modules: Modules, frozen: dict[str, Any],
            batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """The deterministic part of a stage's inputs: `(target [B,T',H',W',C], first [B,1,H',W',C], cond [B,1 or T',
    H',W',C], text)` where `text` holds `context` and, for stage 2 with added layers, `local_context`, `token_ids`,
    `cross_token_ids`, `local_ids`, `local_mask`."""
    stage, ae = config.stage, modules.autoencoder
    te = frozen["text_encoder"]

    def encode(key):
        if f"{key}_latent" in batch:
            return batch[f"{key}_latent"].astype(jnp.float32)
        return jax.lax.stop_gradient(ae.encode(to_unit_range(batch[key])).astype(jnp.float32))

    if stage == 1:
        target = encode("trajectory")
        if "video_latent" in batch:
            first = batch["video_latent"][:, :1].astype(jnp.float32)
        else:  # causal autoencoder: latent frame 0 is the first frame alone
            first = jax.lax.stop_gradient(ae.encode(to_unit_range(batch["video"][:, :1])).astype(jnp.float32))
        cond = target[:, :1]
        text_ids, text_mask = batch["motion_tokens"], batch["motion_mask"]
    else:
        target = encode("video")
        first = target[:, :1]
        cond = encode("trajectory")
        text_ids, text_mask = batch["caption_tokens"], batch["caption_mask"]
    b = target.shape[0]
    text: dict[str, Any] = {"context": encode_text(modules, te, text_ids, text_mask)}
    if stage == 2 and config.model.ttm_layers > 0:
        from ttm_jax.models import masks

        geometry = dict(time_factor=ae.time_factor, space_factor=ae.space_factor,
                        patch_size=tuple(config.model.patch_size))
        om = batch["object_masks"].astype(bool)
        text["token_ids"] = masks.token_ids_from_masks(om, **geometry)
        by = masks.token_ids_from_boxes if config.model.cross_ids_from == "bbox" else masks.token_ids_from_masks
        text["cross_token_ids"] = by(om, **geometry)
        lt, lm = batch["local_tokens"], batch["local_mask"].astype(bool)
        s, lp = lt.shape[1], lt.shape[2]
        text["local_context"] = encode_text(modules, te, lt.reshape(b * s, lp), lm.reshape(b * s, lp)).reshape(
            b, s * lp, -1)
        text["local_mask"] = lm
        text["local_ids"] = masks.local_prompt_ids(lm)
    return target, first, cond, text


def drop_text_conditions(config: ml_collections.ConfigDict, modules: Modules, frozen: dict[str, Any],
                         text: dict[str, Any], drop: jax.Array) -> dict[str, Any]:
    """Replace the text of the examples where `drop [B]` is true by the empty prompt: the caption / motion prompt
    and, for stage 2, every local-prompt slot (its ids follow the empty prompt's mask). Returns the model kwargs
    (without `local_mask`)."""
    out = dict(text)
    out["context"] = flow.drop_text(text["context"], frozen["empty_context"], drop)
    lm = out.pop("local_mask", None)
    if lm is not None:
        from ttm_jax.models import masks

        s = lm.shape[1]
        empty_local = frozen["empty_local_context"]  # [1, Lp, d]
        out["local_context"] = flow.drop_text(text["local_context"], jnp.tile(empty_local, (1, s, 1)), drop)
        empty_mask = jnp.broadcast_to(frozen["empty_local_mask"].astype(bool)[:, None, :], lm.shape)
        out["local_ids"] = masks.local_prompt_ids(jnp.where(drop[:, None, None], empty_mask, lm))
    return out


def draw(rng: jax.Array, batch_size: int, latent: tuple[int, ...], objective: ml_collections.ConfigDict
         ) -> dict[str, jax.Array]:
    """All the step's randomness for the *global* batch at once: `t [B]`, `eps [B, T', H', W', C]`, `drop_image
    [B]`, `drop_text [B]`. Drawn before any split (threefry is partitionable), so every mesh and every
    gradient-accumulation split sees exactly the same values for the same example."""
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    drop_image, drop_text = flow.dropout_masks(k_drop, batch_size, objective)
    return {"t": flow.sample_time(k_t, batch_size, objective),
            "eps": jax.random.normal(k_eps, (batch_size, *latent), jnp.float32),
            "drop_image": drop_image, "drop_text": drop_text}


def model_inputs(config: ml_collections.ConfigDict, modules: Modules, frozen: dict[str, Any],
                 batch: dict[str, jax.Array], rand: dict[str, jax.Array]
                 ) -> tuple[jax.Array, dict[str, Any], jax.Array]:
    """Noisy stage input, the model's other arguments and the velocity target for one (micro-)batch.

    `rand`: this (micro-)batch's rows of `draw`. Returns `(x [B,T',H',W',3C], kwargs for model.__call__
    (timestep, context, ...), target [B,T',H',W',C])`.
    """
    target, first, cond, text = prepare(config, modules, frozen, batch)
    t, eps = rand["t"], rand["eps"]
    if eps.shape != target.shape:
        raise ValueError(f"train step: latents {target.shape} but config.autoencoder/config.data give "
                         f"{eps.shape}; cached latents must match ttm_jax.config.latent_shape(config)")
    noisy = flow.interpolate(target, eps, t)
    velocity = flow.velocity_target(target, eps)
    drop_img = rand["drop_image"]
    x = _stage_input(config.stage, noisy, flow.drop_image(first, drop_img), flow.drop_image(cond, drop_img))
    kwargs = drop_text_conditions(config, modules, frozen, text, rand["drop_text"])
    kwargs["timestep"] = flow.wan_timestep(t)
    return x, kwargs, velocity


def make_loss_fn(config: ml_collections.ConfigDict, modules: Modules) -> Callable[..., tuple[jax.Array, dict]]:
    """`(params, frozen, batch, rand) -> (loss, aux)`: the flow-matching MSE of one (micro-)batch."""

    def loss_fn(params, frozen, batch, rand):
        x, kwargs, target = model_inputs(config, modules, frozen, batch, rand)
        timestep, context = kwargs.pop("timestep"), kwargs.pop("context")
        pred = modules.model.apply({"params": params}, x, timestep, context, **kwargs)
        return flow.loss(pred, target), {}

    return loss_fn


def _microbatches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """`[B, ...]` -> `[A, B/A, ...]`, micro-batch i = rows i, i+A, ... (device-local under batch sharding)."""

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(f"config.train.grad_accum_steps: {accum} does not divide the batch {x.shape[0]}; "
                             f"make train.batch_size a multiple of it")
        return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


# Compiled functions are reused by later `train` calls in the same process (tests, notebooks, sweeps) when the config,
# the modules object, the mesh and the shardings are the same: jax.jit caches per function object.
_CACHE: dict[tuple, Any] = {}


def cache_key(config: ml_collections.ConfigDict, modules: Any, mesh: jax.sharding.Mesh, *extra: Any) -> tuple:
    """Everything a compiled function depends on; `train` fields that only bound or log a run are left out."""
    c = config.to_dict()
    c["train"] = {k: c["train"][k] for k in ("batch_size", "grad_accum_steps")}
    return (repr(sorted(c.items())), id(modules), tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()),
            *map(repr, extra))


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def make_train_step(config: ml_collections.ConfigDict, modules: Modules, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules: sharding_lib.Rules, state_shardings: state_lib.TrainState,
                    frozen_shardings: Any, batch_shardings: dict[str, Any]) -> Callable:
    """The jitted `(state, frozen, batch) -> (state, metrics)`; the state is donated (cached per config/mesh)."""
    key = cache_key(config, modules, mesh, "train_step", rules, state_shardings, frozen_shardings, batch_shardings)
    return cached(key, lambda: _make_train_step(config, modules, tx, mesh, rules, state_shardings, frozen_shardings,
                                                batch_shardings))


def _make_train_step(config, modules, tx, mesh, rules, state_shardings, frozen_shardings, batch_shardings):
    loss_fn = make_loss_fn(config, modules)
    accum = int(config.train.grad_accum_steps)
    ema_decay = float(config.optim.ema_decay)
    schedule = state_lib.learning_rate_schedule(config.optim)
    base_rng = jax.random.PRNGKey(int(config.seed))
    latent = config_lib.latent_shape(config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, frozen, batch):
        batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        rng = jax.random.fold_in(base_rng, state.step)
        b = next(iter(batch.values())).shape[0]
        rand = draw(rng, b, latent, config.objective)
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
        new_state = state_lib.apply_gradients(state, grads, tx, ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step),
                   "param_norm": optax.global_norm(new_state.params)}
        return new_state, metrics

    replicated = sharding_lib.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    options = compiler_options(config)
    compiled = []

    def run(state, frozen, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            if not options:
                return jitted(state, frozen, batch)
            if not compiled:  # ahead-of-time, once: the step's shapes never change within a run
                compiled.append(jitted.lower(state, frozen, batch).compile(compiler_options=options))
            return compiled[0](state, frozen, batch)

    run.jitted = jitted  # for `.lower(...)` (memory analysis in bench/)
    return run


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """`config.train.compiler_options` as XLA options for `Lowered.compile` (e.g. `xla_backend_optimization_level=0`
    cuts CPU compile time several-fold for tests and debugging runs); None when empty."""
    opts = config.train.get("compiler_options", None)
    if not opts:
        return None
    return dict(opts.to_dict() if isinstance(opts, ml_collections.ConfigDict) else opts)


def jit_call(fn: Callable, options: dict[str, Any] | None, *args: Any) -> Any:
    """Call an already `jax.jit`-wrapped `fn` on `args`, compiled with `options` when given."""
    if not options:
        return fn(*args)
    return fn.lower(*args).compile(compiler_options=options)(*args)


# ---------------------------------------------------------------------------------------------------------------------
# frozen parts and batches


def init_frozen(config: ml_collections.ConfigDict, modules: Modules, mesh: jax.sharding.Mesh,
                rules: sharding_lib.Rules) -> tuple[dict[str, Any], dict[str, Any]]:
    """The frozen inputs of the step: text encoder params (converted weights or random from `config.seed`) and the
    empty prompt's embeddings `[1, Lc, d]`, `[1, Lp, d]` (what dropped text becomes) with its local mask `[1, Lp]`.
    Returns `(frozen, shardings)`."""
    return cached(cache_key(config, modules, mesh, "frozen", rules), lambda: _init_frozen(config, modules, mesh, rules))


def _init_frozen(config, modules, mesh, rules):
    t = config.text_encoder
    ids, mask = modules.tokenizer.encode([""], int(t.max_length))
    lids, lmask = modules.tokenizer.encode([""], int(t.local_max_length))
    rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0x7E47)

    def init_te(r):
        return modules.text_encoder.init(r, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))["params"]

    if t.get("path", ""):
        te_params, te_sh = _load_text_encoder(config, init_te, rng, mesh, rules)
    else:
        te_params, te_sh = sharding_lib.init_sharded(init_te, rng, mesh=mesh, rules=rules,
                                                     compiler_options=compiler_options(config))
    rep = sharding_lib.replicated(mesh)

    def empties(te):
        return (encode_text(modules, te, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)),
                encode_text(modules, te, jnp.asarray(lids, jnp.int32), jnp.asarray(lmask, bool)))

    empty, empty_local = jit_call(jax.jit(empties, out_shardings=(rep, rep)), compiler_options(config), te_params)
    frozen = {"text_encoder": te_params, "empty_context": empty, "empty_local_context": empty_local,
              "empty_local_mask": jax.device_put(np.asarray(lmask, bool), rep)}
    shardings = {"text_encoder": te_sh, "empty_context": rep, "empty_local_context": rep, "empty_local_mask": rep}
    return frozen, shardings


def _load_text_encoder(config: ml_collections.ConfigDict, init_te: Callable, rng: jax.Array,
                       mesh: jax.sharding.Mesh, rules: sharding_lib.Rules) -> tuple[Any, Any]:
    """Converted text-encoder weights at `config.text_encoder.path`, placed in their shardings: a transformers
    folder (converted on the fly by `ttm_jax.convert.t5`) or an Orbax checkpoint of converted params."""
    import orbax.checkpoint as ocp

    path = config.text_encoder.path
    abstract = jax.eval_shape(init_te, rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
    from ttm_jax.convert import t5 as t5_convert

    if t5_convert.is_transformers_checkpoint(path):
        host = t5_convert.load_params(config.text_encoder, path)
        return jax.tree.map(lambda x, sh: jax.device_put(np.asarray(x), sh), host, shardings), shardings
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          sharding_lib.unbox(abstract), shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path, target)
    return params, shardings


def batch_shardings(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, Any]:
    return {k: sharding_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items() if k in BATCH_KEYS}


def global_batch(local: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global `jax.Array`s (`make_array_from_process_local_data`); keys outside BATCH_KEYS
    are dropped."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in local.items() if k in shardings}
