"""`validate(config)`: every value checked before compute is spent, section by section (`_check_model`, ...), each
raising `ConfigError` naming the field and the fix. A new section's check joins `_CHECKERS`; a backbone's own fields
are checked by the `check` of its family's `config.py` (`ttm_jax/backbones/<family>/config.py`), which `_check_model`
finds by `model.backbone` (`families.family_config`); objective names by the registry.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from ttm_jax.cli import check_config as _check
from ttm_jax.config.families import family_config
from ttm_jax.config.geometry import grid_step, latent_shape
from ttm_jax.config.schema import (
    ATTENTION_IMPLS,
    AUTOENCODERS,
    CONDITION_FRAMES,
    CROSS_IDS_FROM,
    DTYPES,
    IDENTITY_LATENT_NORM,
    REMAT_POLICIES,
    STAGE1_LATER_IDS,
    SYNTHETIC_FULL_RUNG,
    SYNTHETIC_RUNGS,
)
from ttm_jax.config.stages import STAGES


def _check_model(config: ml_collections.ConfigDict) -> None:
    """model section: the fields shared by every backbone, then the backbone's own by its family's `check`
    (`families.family_config`: the DiT's fields, the U-Net's `model.unet`), and their agreement with the stage and the
    text encoder. Other backbones (registered outside a family, e.g. in tests) check their own fields."""
    m = config.model
    _check(isinstance(m.ttm_layers, int) and m.ttm_layers >= 0, "model.ttm_layers",
           f"{m.ttm_layers!r} must be an int >= 0")
    _check(m.attention in ATTENTION_IMPLS, "model.attention", f"{m.attention!r}; choose one of {ATTENTION_IMPLS}")
    _check(isinstance(m.attention_sparse, bool), "model.attention_sparse",
           f"{m.attention_sparse!r} must be True or False")
    _check(m.context_impl in ("ulysses", "ring"), "model.context_impl",
           f"{m.context_impl!r}; choose ulysses (all-to-all over heads) or ring (keys passed around the ring)")
    _check(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
           f"{m.remat_policy!r}; choose one of {REMAT_POLICIES}")
    _check(isinstance(m.scan_unroll, int) and m.scan_unroll >= 0, "model.scan_unroll",
           f"{m.scan_unroll!r} must be an int >= 0 (0: per backend, all blocks unrolled on CPU)")
    _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r}; choose one of {DTYPES}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r}; choose one of {DTYPES}")
    _check(m.condition_frames in CONDITION_FRAMES, "model.condition_frames",
           f"{m.condition_frames!r}; choose first (latent frame 0, zeros after), all (every latent frame) or "
           f"indexed (every latent frame, and a channel with the frame's place)")
    _check(isinstance(m.self_condition, bool), "model.self_condition",
           f"{m.self_condition!r} must be True or False")
    _check(m.cross_ids_from in CROSS_IDS_FROM, "model.cross_ids_from",
           f"{m.cross_ids_from!r}; choose one of {CROSS_IDS_FROM}")
    _check(config.stage != 1 or m.ttm_layers == 0 or not (m.ttm_masked and m.ttm_masked_self),
           "model.ttm_masked_self",
           f"True with model.ttm_layers={m.ttm_layers} in stage 1: stage 1 knows the objects' ids in the first frame "
           "only (their later places are what it generates), so its added self-attention cannot be masked; set "
           "model.ttm_masked_self=False (its masked cross-attention gives each object's first-frame tokens its "
           "local prompt), or model.ttm_layers=0")
    _check(m.stage1_later_ids in STAGE1_LATER_IDS, "model.stage1_later_ids",
           f"{m.stage1_later_ids!r}; choose one of {STAGE1_LATER_IDS}")
    _check(config.stage != 0 or not m.ttm_masked, "model.ttm_masked",
           "True but the TI2V baseline (stage 0) has no trajectory, so no object ids to mask with; set False")
    family = family_config(config)
    if family is not None:
        family.check(config)


def _check_autoencoder(config: ml_collections.ConfigDict) -> None:
    """autoencoder section (ttm_jax/models/autoencoder.py, ttm_jax/backbones/wan/vae.py)."""
    a = config.autoencoder
    _check(a.name in AUTOENCODERS, "autoencoder.name", f"{a.name!r}; choose one of {AUTOENCODERS}")
    _check(a.dtype in DTYPES, "autoencoder.dtype", f"{a.dtype!r}; choose one of {DTYPES}")
    _check(isinstance(a.chunk_frames, int) and a.chunk_frames >= 0, "autoencoder.chunk_frames",
           f"{a.chunk_frames!r} must be an int >= 0 (0: the whole clip in one pass)")
    if a.name == "wan":
        _check(a.latent_channels > 0 and a.time_factor > 0 and a.space_factor > 0, "autoencoder",
               "latent_channels, time_factor and space_factor must be positive (Wan 2.1: 16, 4, 8); the weights' "
               "config.json is checked against them when the VAE loads")
    if a.name == "sd":
        _check(a.time_factor == 1, "autoencoder.time_factor",
               f"{a.time_factor} but the SD VAE is 2D (applied per frame); set autoencoder.time_factor=1")
        _check(a.latent_channels > 0 and a.space_factor > 0, "autoencoder",
               "latent_channels and space_factor must be positive (SD 1.5: 4 and 8); the weights' config.json is "
               "checked against them when the VAE loads")
    scale, shift = a.scaling_factor, a.shift_factor
    _check(isinstance(scale, (int, float)) and scale > 0, "autoencoder.scaling_factor", f"{scale!r} must be > 0")
    _check(isinstance(shift, (int, float)), "autoencoder.shift_factor", f"{shift!r} must be a number")
    if a.name != "space_to_depth":
        _check((scale, shift) == tuple(IDENTITY_LATENT_NORM.values()), "autoencoder.scaling_factor",
               f"{scale} (shift_factor {shift}) but the {a.name} VAE normalises its latents as its weights' "
               "config.json says; leave scaling_factor=1 and shift_factor=0")
    if a.name == "space_to_depth":
        want = 3 * a.space_factor**2 * a.time_factor
        _check(a.latent_channels == want, "autoencoder.latent_channels",
               f"{a.latent_channels} but space_to_depth with space_factor={a.space_factor}, "
               f"time_factor={a.time_factor} makes {want}; set it to {want}")


def _check_data(config: ml_collections.ConfigDict) -> None:
    """data section (ttm_jax/data), and the clip shape against the autoencoder and the model's patch."""
    a, d = config.autoencoder, config.data
    _check(d.num_frames >= 1 and (d.num_frames - 1) % a.time_factor == 0, "data.num_frames",
           f"{d.num_frames} must be 1 + a multiple of autoencoder.time_factor={a.time_factor} "
           f"(e.g. {1 + a.time_factor * max(1, (d.num_frames - 1) // a.time_factor)})")
    patch = grid_step(config)  # the backbone family's grid step (the DiT's patch, the U-Net's 2^(levels-1))
    step = a.space_factor * patch[1]
    _check(d.height % step == 0, "data.height",
           f"{d.height} must be a multiple of autoencoder.space_factor x patch = {step}")
    step = a.space_factor * patch[2]
    _check(d.width % step == 0, "data.width",
           f"{d.width} must be a multiple of autoencoder.space_factor x patch = {step}")
    lt = 1 + (d.num_frames - 1) // a.time_factor
    _check(lt % patch[0] == 0, "model.patch_size",
           f"latent frames {lt} are not divisible by the time patch {patch[0]}")
    _check(d.max_objects >= 0, "data.max_objects", f"{d.max_objects} must be >= 0")
    _check(d.annotation in ("manual", "auto", "both"), "data.annotation",
           f"{d.annotation!r}; choose manual, auto or both")
    _check(d.missing_captions in ("skip", "error"), "data.missing_captions",
           f"{d.missing_captions!r}; choose skip or error")
    _check(d.crop in ("center", "random"), "data.crop", f"{d.crop!r}; choose center or random")
    _check(0.0 < d.fps <= 24.0, "data.fps", f"{d.fps} must be in (0, 24] (SA-V videos are 24 fps)")
    _check(d.max_objects <= 26, "data.max_objects", f"{d.max_objects} exceeds the 26-colour trajectory palette "
           "(ttm_jax/data/trajectory.py); use <= 26")
    _check(0.0 <= d.min_object_area < 1.0, "data.min_object_area", f"{d.min_object_area} must be in [0, 1)")
    _check(isinstance(d.num_workers, int) and d.num_workers >= 0, "data.num_workers",
           f"{d.num_workers!r} must be an int >= 0 (0: no worker processes)")
    _check(isinstance(d.read_threads, int) and d.read_threads >= 0, "data.read_threads",
           f"{d.read_threads!r} must be an int >= 0 (0: read in the main thread, nothing read ahead)")
    _check(0 <= d.shuffle_seed < 2**32, "data.shuffle_seed", f"{d.shuffle_seed} must be in [0, 2**32) (Grain's range)")
    _check(d.synthetic_num_videos >= 1, "data.synthetic_num_videos", f"{d.synthetic_num_videos} must be >= 1")
    rung = d.synthetic_rung
    _check(rung in SYNTHETIC_RUNGS, "data.synthetic_rung",
           f"{rung!r}; choose one of {SYNTHETIC_RUNGS} (ladder rungs; {SYNTHETIC_FULL_RUNG}: the full set)")
    _check(isinstance(d.cached, bool), "data.cached", f"{d.cached!r} must be True or False")
    _check(not d.cached or bool(d.prepared_path), "data.cached",
           "True needs data.prepared_path: set it to the --out folder of `python -m ttm_jax.data.encode "
           "--prepared=... --out=...`, or set data.cached=False")


def _check_text_encoder(config: ml_collections.ConfigDict) -> None:
    """text_encoder section (ttm_jax/models/text_encoder.py, ttm_jax/models/tokenizer.py). A sentencepiece tokenizer
    without `tokenizer_path` passes: describe mode needs none, and `preflight` refuses it before training."""
    t = config.text_encoder
    _check(t.d_model > 0 and t.num_layers > 0, "text_encoder", "d_model and num_layers must be positive")
    _check(t.tokenizer in ("byte", "word", "sentencepiece", "clip"), "text_encoder.tokenizer",
           f"{t.tokenizer!r}; choose byte, word, sentencepiece or clip")
    _check((t.name == "clip") == (t.tokenizer == "clip"), "text_encoder.tokenizer",
           f"{t.tokenizer!r} with text_encoder.name={t.name!r}; the CLIP text encoder reads CLIP's BPE ids "
           f"and only it does: use name='clip' with tokenizer='clip' (ttm_jax/backbones/animatediff/text_weights.py)")
    for name in ("vocab_size", "num_heads", "d_kv", "d_ff", "relative_attention_num_buckets",
                 "relative_attention_max_distance", "max_length", "local_max_length"):
        _check(isinstance(t[name], int) and t[name] > 0, f"text_encoder.{name}", f"{t[name]!r} must be a positive int")
    _check(t.relative_attention_num_buckets % 4 == 0 and t.relative_attention_max_distance
           > t.relative_attention_num_buckets // 4, "text_encoder.relative_attention_num_buckets",
           f"{t.relative_attention_num_buckets} must be a multiple of 4 and relative_attention_max_distance="
           f"{t.relative_attention_max_distance} larger than a quarter of it (T5 uses 32 and 128)")
    _check(t.tokenizer != "byte" or t.vocab_size >= 259, "text_encoder.vocab_size",
           f"{t.vocab_size} is too small for the byte tokenizer's 259 ids (ByT5 uses 384); set it to >= 259")
    _check(t.tokenizer != "word" or t.vocab_size >= 64, "text_encoder.vocab_size",
           f"{t.vocab_size} is too small for the word tokenizer's hash table; set it to >= 64 (2048 keeps "
           f"the synthetic prompts' words apart)")
    _check(t.feed_forward == "gated-gelu", "text_encoder.feed_forward",
           f"{t.feed_forward!r}; only gated-gelu (T5 v1.1, ByT5, umT5) is implemented")
    _check(t.dtype in DTYPES, "text_encoder.dtype", f"{t.dtype!r}; choose one of {DTYPES}")
    _check(t.param_dtype in DTYPES, "text_encoder.param_dtype",
           f"{t.param_dtype!r}; choose one of {DTYPES}")


def _check_sample(config: ml_collections.ConfigDict) -> None:
    """sample section: the sampler of training samples (ttm_jax/diffusion)."""
    s = config.sample
    _check(isinstance(s.num_steps, int) and s.num_steps >= 1, "sample.num_steps",
           f"{s.num_steps!r} must be an int >= 1")
    _check(s.schedule in ("linear_quadratic", "uniform"), "sample.schedule",
           f"{s.schedule!r}; choose linear_quadratic (Movie Gen) or uniform")
    _check(s.image_scale >= 0 and s.text_scale >= 0, "sample.image_scale",
           f"image_scale={s.image_scale}, text_scale={s.text_scale} must be >= 0 (1 and 1: no guidance)")


def _check_train(config: ml_collections.ConfigDict) -> None:
    """train section (ttm_jax/train)."""
    tr = config.train
    for name in ("batch_size", "grad_accum_steps", "total_steps", "checkpoint_every_steps", "log_every_steps"):
        _check(isinstance(tr[name], int) and tr[name] > 0, f"train.{name}", f"{tr[name]!r} must be a positive int")
    _check(tr.batch_size % tr.grad_accum_steps == 0, "train.grad_accum_steps",
           f"{tr.grad_accum_steps} does not divide train.batch_size={tr.batch_size}; pick a divisor")
    _check(tr.sample_every_steps >= 0, "train.sample_every_steps", f"{tr.sample_every_steps} must be >= 0 (0: never)")


def _check_optim(config: ml_collections.ConfigDict) -> None:
    """optim section (ttm_jax/train)."""
    o = config.optim
    _check(o.learning_rate > 0, "optim.learning_rate", f"{o.learning_rate} must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", f"{o.ema_decay} must be in [0, 1) (0: no EMA)")
    cool = o.cooldown_steps
    room = config.train.total_steps - o.warmup_steps
    _check(type(cool) is int and (cool == 0 or 0 < cool <= room), "optim.cooldown_steps",
           f"{cool!r} must be 0 (off) or an int of at most train.total_steps - optim.warmup_steps = {room}; lower it"
           f" or raise train.total_steps")
    share = o.cooldown_fraction
    _check(isinstance(share, (int, float)) and 0.0 <= share <= 1.0, "optim.cooldown_fraction",
           f"{share!r} must be in [0, 1] (0: off; 0.5: the fall takes the run's second half)")
    _check(o.grad_clip_norm >= 0, "optim.grad_clip_norm", f"{o.grad_clip_norm} must be >= 0 (0: no clipping)")


def _check_objective(config: ml_collections.ConfigDict) -> None:
    """objective section (ttm_jax/assembly/objectives.py, ttm_jax/diffusion/flow.py, ttm_jax/diffusion/ddim.py)."""
    j = config.objective
    # objective.name is checked by the registry (`assembly/objectives.py: OBJECTIVES`), where new ones register
    if j.name == "ddim_v":
        _check(isinstance(j.num_train_timesteps, int) and j.num_train_timesteps >= 2, "objective.num_train_timesteps",
               f"{j.num_train_timesteps!r} must be an int >= 2 (1000 for SD 1.5 / AnimateDiff)")
        _check(0 < j.beta_start < j.beta_end < 1, "objective.beta_start",
               f"beta_start={j.beta_start}, beta_end={j.beta_end}: need 0 < beta_start < beta_end < 1")
        _check(j.beta_schedule in ("scaled_linear", "linear"), "objective.beta_schedule",
               f"{j.beta_schedule!r}; choose scaled_linear or linear")
        _check(j.timestep_spacing in ("trailing", "leading", "linspace"), "objective.timestep_spacing",
               f"{j.timestep_spacing!r}; choose trailing (zero terminal SNR needs it), leading or linspace")
        _check(int(config.sample.num_steps) <= j.num_train_timesteps, "sample.num_steps",
               f"{config.sample.num_steps} exceeds objective.num_train_timesteps={j.num_train_timesteps}")
    _check(j.t_sampling in ("logit_normal", "uniform"), "objective.t_sampling",
           f"{j.t_sampling!r}; choose logit_normal or uniform")
    _check(j.shift > 0, "objective.shift", f"{j.shift} must be > 0 (1: no shift)")
    probs = (j.drop_image_prob, j.drop_text_prob, j.drop_both_prob)
    _check(all(0 <= p <= 1 for p in probs) and sum(probs) <= 1, "objective.drop_image_prob",
           f"condition dropout rates {probs} (image, text, both) must be in [0, 1] and sum to <= 1")


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    """mesh section (ttm_jax/runtime/mesh.py)."""
    h = config.mesh
    _check(h.distributed in ("auto", "skip"), "mesh.distributed", f"{h.distributed!r}; choose auto or skip")
    sizes = dict(h.shape)
    _check(set(sizes) <= {"data", "fsdp", "tensor"}, "mesh.shape", f"{sorted(sizes)}: the axes are data, fsdp, tensor")
    _check(sum(1 for v in sizes.values() if v == -1) <= 1 and all(v == -1 or v > 0 for v in sizes.values()),
           "mesh.shape", f"{sizes}: sizes must be positive, at most one -1 (all remaining devices)")
    context = h.context
    _check(type(context) is int and context >= 1, "mesh.context",
           f"{context!r} must be an int >= 1 (1: the video tokens are not split)")
    if context == 1:
        return
    family = family_config(config)
    check_context = getattr(family, "check_context", None)
    _check(check_context is not None, "mesh.context",
           f"{context} but model.backbone={config.model.backbone!r} has no context-parallel path (a family's "
           f"config.py that has one checks it in its check_context; ttm_jax/models/context_parallel.py); set "
           f"mesh.context=1")
    check_context(config, context, latent_shape(config)[:3])


# In the order `validate` runs them: a config with several bad values reports the first of this order.
_CHECKERS: tuple[Callable[[ml_collections.ConfigDict], None], ...] = (
    _check_model, _check_autoencoder, _check_data, _check_text_encoder, _check_sample, _check_train, _check_optim,
    _check_objective, _check_mesh,
)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every value that could otherwise fail after compute has been spent; returns the config."""
    _check(config.stage in STAGES, "stage", f"{config.stage!r} is not one of {sorted(STAGES)} "
           f"({'; '.join(f'{k}: {v.description}' for k, v in STAGES.items())})")
    for check in _CHECKERS:
        check(config)
    return config
