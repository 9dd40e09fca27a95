"""A stage's inputs from a batch, and the model call given its conditions.

  1. latents: the batch's cached `video_latent`/`trajectory_latent` when present, else the frozen autoencoder on the
     uint8 videos (mapped to [-1, 1]); text: the batch's cached `<text>_embedding` / `local_embedding` when present
     (`python -m ttm_jax.data.encode`, `config.data.cached`), else the frozen text encoder on the token ids
     (padding rows zeroed, or kept for CLIP: `encode_text`) -- with both cached, neither encoder is in the traced step;
  2. the stage kind (`STAGE_KINDS`, by `config.stage`) picks the target and the conditions (DESIGN.md):
       stage 1  target E(trajectory); conditions E(x0), E(s0) (first frames); text = motion prompt, plus, with
                added layers (`model.ttm_layers > 0`), local prompts for their masked cross-attention with object ids
                from the first frame's masks only (the later places are what stage 1 generates)
       stage 2  target E(video);      conditions E(x0), E(trajectory);        text = caption, plus local prompts and
                per-token object ids for the added masked layers (the backbone's `object_ids`)
       stage 0  target E(video);      condition E(x0);                        text = caption, plus local prompts for
                the added layers, unmasked (the single-stage TI2V baseline: no trajectory, no object ids)
  3. the objective (`objectives.py`): times, the noisy input, the loss target; condition dropout (null image = zeros,
     null text = the empty prompt, for the caption and every local-prompt slot).

`prepare` and `drop_text_conditions` are what both training and sampling call, so that what the model sees at
sampling is what it saw in training; `model_fn` is the one model call given conditions (training samples, guided
sampling).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ttm_jax import config as config_lib
from ttm_jax.assembly import objectives, registry
from ttm_jax.assembly.modules import Modules
from ttm_jax.assembly.registry import Registry
from ttm_jax.diffusion import flow
from ttm_jax.models import conditioning, masks

# Batch keys a stage reads (CONTRIBUTING.md "Batches"); anything else in a batch is ignored.
BATCH_KEYS = ("video", "trajectory", "object_masks", "num_objects", "caption_tokens", "caption_mask",
              "motion_tokens", "motion_mask", "local_tokens", "local_mask", "video_latent", "trajectory_latent",
              "caption_embedding", "motion_embedding", "local_embedding")


def to_unit_range(video: jax.Array) -> jax.Array:
    """uint8 `[..., 3]` -> float32 in [-1, 1]."""
    return video.astype(jnp.float32) / 127.5 - 1.0


def encode_text(modules: Modules, te_params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Frozen text embeddings `[B, L, d]`; padding positions zeroed (as Wan feeds umT5 outputs) when the text
    encoder's registry entry says so (`modules.text_zero_padding`), else kept as the encoder returns them (CLIP: SD
    1.5's U-Net was trained on CLIP's outputs at padded positions)."""
    emb = modules.text_encoder.apply({"params": te_params}, ids, mask.astype(bool))
    if getattr(modules, "text_zero_padding", True):
        emb = emb * mask[..., None].astype(emb.dtype)
    return jax.lax.stop_gradient(emb)


# ----------------------------------------------------------------------------------------------------- stage kinds


@dataclasses.dataclass(frozen=True)
class StageKind:
    """What a stage denoises and what conditions it.

    latents: `(autoencoder, batch, encode) -> (target [B,T',H',W',C], first [B,1,...], cond [B,1 or T',...] or None,
      text_ids [B, L], text_mask [B, L])`, where `encode(key)` is the latent of `batch[key]` (cached or encoded).
    model_input: `(noisy, first, cond, frames) -> [B, T', H', W', in_channels]`, the backbone's channel-concatenated
      input (`frames`: `config.model.condition_frames`, see `conditioning.stage_input`).
    local_prompts: whether the stage feeds the local prompts to the added layers (when the model has them).
    object_ids: whether it feeds per-token object ids from the batch's object masks (for the masks of those layers):
      "clip" (every frame's masks: stage 2's trajectory), "first" (the first frame's only, tokens of later frames are
      background: stage 1, which generates the later places) or "" (none).
    text: the batch prefix of the text `latents` returns (`caption` / `motion`): its cached `<text>_embedding` is used
      when the batch has it; "" for a kind that never reads cached text.
    """

    latents: Callable[..., tuple[Any, ...]]
    model_input: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
    local_prompts: bool
    object_ids: str
    text: str = ""


def _image_to_motion(ae: Any, batch: dict[str, jax.Array], encode: Callable[[str], jax.Array]) -> tuple:
    target = encode("trajectory")
    if "video_latent" in batch:
        first = batch["video_latent"][:, :1].astype(jnp.float32)
    else:  # causal autoencoder: latent frame 0 is the first frame alone
        first = jax.lax.stop_gradient(ae.encode(to_unit_range(batch["video"][:, :1])).astype(jnp.float32))
    return target, first, target[:, :1], batch["motion_tokens"], batch["motion_mask"]


def _motion_to_video(ae: Any, batch: dict[str, jax.Array], encode: Callable[[str], jax.Array]) -> tuple:
    del ae
    target = encode("video")
    return target, target[:, :1], encode("trajectory"), batch["caption_tokens"], batch["caption_mask"]


def _image_to_video(ae: Any, batch: dict[str, jax.Array], encode: Callable[[str], jax.Array]) -> tuple:
    del ae
    target = encode("video")
    return target, target[:, :1], None, batch["caption_tokens"], batch["caption_mask"]


def _stage_input(stage: int) -> Callable[..., jax.Array]:
    return lambda x, first, cond, frames="first": conditioning.stage_input(stage, x, first, cond, frames=frames)


STAGE_KINDS: Registry[StageKind] = Registry("stage")
STAGE_KINDS.register(1, StageKind(_image_to_motion, _stage_input(1), local_prompts=True, object_ids="first",
                                  text="motion"))
STAGE_KINDS.register(2, StageKind(_motion_to_video, _stage_input(2), local_prompts=True, object_ids="clip",
                                  text="caption"))
STAGE_KINDS.register(0, StageKind(_image_to_video, _stage_input(0), local_prompts=True, object_ids="",
                                  text="caption"))


def stage_kind(config: ml_collections.ConfigDict) -> StageKind:
    return STAGE_KINDS.get(config.stage)


# ----------------------------------------------------------------------------------------------------------- inputs


def prepare(config: ml_collections.ConfigDict, modules: Modules, frozen: dict[str, Any],
            batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """The deterministic part of a stage's inputs: `(target [B,T',H',W',C], first [B,1,H',W',C], cond [B,1 or T',
    H',W',C], text)` where `text` holds `context` and, for a stage with added layers, `local_context`, `token_ids`,
    `cross_token_ids`, `local_ids`, `local_mask`. Cached latents and embeddings in the batch are used as they are
    (`frozen` then need not hold the text encoder: `init_frozen(..., cached=True)`)."""
    kind, ae = stage_kind(config), modules.autoencoder

    def text_encoder(ids, mask, cached_key):
        if cached_key in batch:
            return batch[cached_key].astype(jnp.float32)
        if "text_encoder" not in frozen:
            raise ValueError(f"inputs.prepare: the batch has no cached {cached_key!r} and the frozen inputs hold no "
                             f"text encoder (config.data.cached=True); point config.data.prepared_path at a folder of "
                             f"`python -m ttm_jax.data.encode`, or set config.data.cached=False")
        return encode_text(modules, frozen["text_encoder"], ids, mask)

    def encode(key):
        if f"{key}_latent" in batch:
            return batch[f"{key}_latent"].astype(jnp.float32)
        return jax.lax.stop_gradient(ae.encode(to_unit_range(batch[key])).astype(jnp.float32))

    target, first, cond, text_ids, text_mask = kind.latents(ae, batch, encode)
    b = target.shape[0]
    text: dict[str, Any] = {"context": text_encoder(text_ids, text_mask, f"{kind.text}_embedding")}
    if kind.local_prompts and config.model.ttm_layers > 0:
        if kind.object_ids:
            object_masks = batch["object_masks"].astype(bool)
            if kind.object_ids == "first":  # never the places stage 1 generates: later frames are background or
                # hold the first frame's ids (config.model.stage1_later_ids)
                later = (object_masks[:, :1] if config.model.stage1_later_ids == "start"
                         else False)
                object_masks = object_masks.at[:, 1:].set(later)
            text["token_ids"], text["cross_token_ids"] = registry.object_ids(config, ae, object_masks)
        lt, lm = batch["local_tokens"], batch["local_mask"].astype(bool)
        s, lp = lt.shape[1], lt.shape[2]
        text["local_context"] = text_encoder(lt.reshape(b * s, lp), lm.reshape(b * s, lp), "local_embedding").reshape(
            b, s * lp, -1)
        text["local_mask"] = lm
        text["local_ids"] = masks.local_prompt_ids(lm)
    return target, first, cond, text


def drop_text_conditions(config: ml_collections.ConfigDict, modules: Modules, frozen: dict[str, Any],
                         text: dict[str, Any], drop: jax.Array) -> dict[str, Any]:
    """Replace the text of the examples where `drop [B]` is true by the empty prompt: the caption / motion prompt
    and every local-prompt slot (its ids follow the empty prompt's mask). Returns the model kwargs (without
    `local_mask`)."""
    del config, modules
    out = dict(text)
    out["context"] = flow.drop_text(text["context"], frozen["empty_context"], drop)
    lm = out.pop("local_mask", None)
    if lm is not None:
        s = lm.shape[1]
        empty_local = frozen["empty_local_context"]  # [1, Lp, d]
        out["local_context"] = flow.drop_text(text["local_context"], jnp.tile(empty_local, (1, s, 1)), drop)
        empty_mask = jnp.broadcast_to(frozen["empty_local_mask"].astype(bool)[:, None, :], lm.shape)
        out["local_ids"] = masks.local_prompt_ids(jnp.where(drop[:, None, None], empty_mask, lm))
    return out


def draw(rng: jax.Array, batch_size: int, latent: tuple[int, ...], objective: ml_collections.ConfigDict,
         self_condition: bool = False) -> dict[str, jax.Array]:
    """All of a step's randomness for the *global* batch at once: `t [B]`, `eps [B, T', H', W', C]`, `drop_image
    [B]`, `drop_text [B]`, and with `self_condition` (`config.model.self_condition`) `self_cond [B]`, the examples
    whose model input carries the first pass's clean estimate (half of them; from a key of its own, so the other
    values are those of a run without it). Drawn before any split (threefry is partitionable), so every mesh and
    every gradient-accumulation split sees exactly the same values for the same example. `objective`:
    `config.objective`."""
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    drop_image, drop_text = flow.dropout_masks(k_drop, batch_size, objective)
    out = {"t": objectives.make_objective(objective).sample_time(k_t, batch_size),
           "eps": jax.random.normal(k_eps, (batch_size, *latent), jnp.float32),
           "drop_image": drop_image, "drop_text": drop_text}
    if self_condition:
        out["self_cond"] = jax.random.bernoulli(jax.random.fold_in(rng, SELF_COND_KEY), 0.5, (batch_size,))
    return out


SELF_COND_KEY = 1_000_003  # fold_in of the step key for the self-conditioning coins


def with_estimate(inp: jax.Array, estimate: jax.Array) -> jax.Array:
    """The stage input `[..., Cin]` with the self-conditioning estimate `[..., C]` inserted after its first `C`
    channels (the noisy latent), the layout `config.in_channels` counts with `model.self_condition`."""
    c = estimate.shape[-1]
    return jnp.concatenate([inp[..., :c], estimate.astype(inp.dtype), inp[..., c:]], axis=-1)


def self_conditioned(x: jax.Array, predict: Callable[[jax.Array], jax.Array], objective: Any,
                     rand: dict[str, jax.Array], channels: int) -> jax.Array:
    """Training's self-conditioning: `x` is the stage input with zeros as the estimate (`with_estimate`); a first
    pass `predict(x)` gives the clean estimate `objective.clean_estimate`, which replaces the zeros (gradients stopped)
    on the examples where `rand["self_cond"]`; the others keep zeros, as the first sampling step sees them."""
    noisy = x[..., :channels]
    est = objective.clean_estimate(noisy, predict(x), rand["t"])
    keep = rand["self_cond"].reshape((-1,) + (1,) * (est.ndim - 1))
    est = jax.lax.stop_gradient(jnp.where(keep, est, 0.0))
    return x.at[..., channels:2 * channels].set(est.astype(x.dtype))


def condition_frames(config: ml_collections.ConfigDict) -> str:
    """`config.model.condition_frames` (`first` for configs saved before the field existed)."""
    return config.model.condition_frames


def model_inputs(config: ml_collections.ConfigDict, modules: Modules, frozen: dict[str, Any],
                 batch: dict[str, jax.Array], rand: dict[str, jax.Array]
                 ) -> tuple[jax.Array, dict[str, Any], jax.Array]:
    """Noisy stage input, the model's other arguments and the loss target for one (micro-)batch.

    `rand`: this (micro-)batch's rows of `draw`. Returns `(x [B,T',H',W',config.in_channels], kwargs for model.__call__
    (timestep, context, ...), target [B,T',H',W',C])`.
    """
    objective = objectives.make_objective(config.objective)
    target, first, cond, text = prepare(config, modules, frozen, batch)
    t, eps = rand["t"], rand["eps"]
    if eps.shape != target.shape:
        raise ValueError(f"train step: latents {target.shape} but config.autoencoder/config.data give "
                         f"{eps.shape}; cached latents must match ttm_jax.config.latent_shape(config)")
    noisy = objective.noisy(target, eps, t)
    y = objective.target(target, eps, t)
    drop_img = rand["drop_image"]
    cond = None if cond is None else flow.drop_image(cond, drop_img)
    x = stage_kind(config).model_input(noisy, flow.drop_image(first, drop_img), cond, condition_frames(config))
    if config_lib.self_condition(config):  # zeros here; `self_conditioned` fills them for half the examples
        x = with_estimate(x, jnp.zeros_like(noisy))
    kwargs = drop_text_conditions(config, modules, frozen, text, rand["drop_text"])
    kwargs["timestep"] = objective.model_time(t)
    return x, kwargs, y


def conditions(first: jax.Array, cond: jax.Array | None, text: dict[str, Any]) -> dict[str, Any]:
    """The conditions `model_fn` takes: `first`, `cond` (absent for a stage without one), `context` and the model's
    other kwargs (no `local_mask`)."""
    visual = {"first": first} if cond is None else {"first": first, "cond": cond}
    return {**visual, **{k: v for k, v in text.items() if k != "local_mask"}}


def model_fn(config: ml_collections.ConfigDict, modules: Modules) -> Callable[..., jax.Array]:
    """The model call given conditions: `(x [B,T',H',W',C] noisy, t [B] objective time, params, conds) -> the
    model's prediction`, `conds` as made by `conditions` (the stage input is concatenated here). With
    `model.self_condition`, `x` is `[..., 2C]`: the noisy latent, then the previous step's clean estimate (the
    samplers' `self_condition=True` carry it)."""
    objective, kind = objectives.make_objective(config.objective), stage_kind(config)
    frames = condition_frames(config)
    c = config.autoencoder.latent_channels
    self_cond = config_lib.self_condition(config)

    def apply(x, t, params, conds):
        if self_cond and x.shape[-1] != 2 * c:
            raise ValueError(f"inputs.model_fn: config.model.self_condition=True takes x = [noisy, previous clean "
                             f"estimate], {2 * c} channels, got {x.shape[-1]}; sample with "
                             f"objectives.sample(..., self_condition=True), or pass zeros as the estimate")
        inp = kind.model_input(x[..., :c] if self_cond else x, conds["first"], conds.get("cond"), frames)
        if self_cond:
            inp = with_estimate(inp, x[..., c:])
        kw = {k: v for k, v in conds.items() if k not in ("first", "cond", "context")}
        return modules.model.apply({"params": params}, inp, objective.model_time(t), conds["context"], **kw)

    return apply
