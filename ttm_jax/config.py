"""The run configuration: one `ml_collections.ConfigDict` is the whole truth of a run.

`configs/stage1.py` and `configs/stage2.py` call `build(stage, arg)`; the argument picks a variant:

  tiny     (default) seconds to minutes on a 2-core CPU, synthetic SA-V data, `space_to_depth` autoencoder
  mid      between tiny and wan1.3b, for benchmarks
  wan1.3b  the shapes of Wan2.1-T2V-1.3B (dim 1536, 30 layers, 12 heads of 128, FFN 8960, text dim 4096)
  wan14b   the shapes of Wan2.1-T2V-14B (dim 5120, 40 layers, 40 heads of 128, FFN 13824, text dim 4096), 720x1280
  tiny_unet    a small AnimateDiff-style U-Net (`backbone="unet"`, `config.model.unet`), `ddim_v`, synthetic SA-V
  animatediff  the paper's U-Net: SD 1.5 + AnimateDiff V3 at 512x512, 16 frames, SD VAE, CLIP ViT-L/14, `ddim_v`

Each variant is one entry of `_VARIANT_TABLE`: the values that differ between variants, section by section; every
other value is common to all variants and set by the section builders (`_model`, `_autoencoder`, ...). A new variant
is one new entry.

`arg` is comma-separated `key=value` pairs and bare words (`parse_arg`): `variant=<name>` or the bare name picks the
variant (`tiny`, `variant=mid`), and the bare word `runlocal` (or `runlocal=1`) asks, as in big_vision, for a tiny,
fast local run of that variant (`configs/stage2.py:mid,runlocal`): the variant's model, autoencoder and text
encoder unchanged, on 2 latent frames of at most 32x32 pixels, batch 2, 8 steps (warm-up 2, a checkpoint every 4, a
log line every step, training samples of 2 sampler steps at the end), 8 synthetic videos, and XLA's fastest compile
(`_RUNLOCAL`); end to end on a shared 2-core CPU, measured: tiny ~30 s, mid ~75 s. The batch of 2 fits one or two
devices; on more, set `--config.train.batch_size`.

`validate(config)` checks every value and raises `ConfigError` naming the field and the fix; `main` calls it before
any compute is spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from ttm_jax import cli

ATTENTION_IMPLS = ("xla", "splash", "gpu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
AUTOENCODERS = ("space_to_depth", "wan", "sd")
# the latent normalisation that leaves an autoencoder's latents as they are: space_to_depth's default, a cache
# manifest's before the fields existed, and the only one the Wan / SD VAEs take here (theirs: their config.json's)
IDENTITY_LATENT_NORM = {"scaling_factor": 1.0, "shift_factor": 0.0}
CROSS_IDS_FROM = ("bbox", "mask")
# model.condition_frames: how the first-frame conditions fill the latent frames (ttm_jax/models/conditioning.py)
CONDITION_FRAMES = ("first", "all", "indexed")
STAGE1_LATER_IDS = ("background", "start")
# The keys of a stage config's argument and their defaults (`parse_arg`).
STAGE_ARGS: dict[str, Any] = {"variant": "tiny", "runlocal": False}
_TRUE = ("1", "true", "yes")


class ConfigError(cli.UserError, ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def parse_arg(arg: str | None, defaults: Mapping[str, Any] | None = None, *, bare_key: str | None = "variant",
              where: str = "config argument") -> dict[str, Any]:
    """`defaults` (default `STAGE_ARGS`) updated by `arg`, comma-separated `key=value` pairs and bare words.

    A value takes the type of its key's default (a bool is true for 1/true/yes, any case). A bare word is `True` for a
    bool key (`runlocal`), else the value of `bare_key` (`"mid"` -> variant=mid); without `bare_key` it is an error.
    A key not in `defaults` raises `ConfigError` naming it and the choices; `where` starts every message.
    """
    defaults = STAGE_ARGS if defaults is None else defaults
    out = dict(defaults)
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            key, value = (x.strip() for x in part.split("=", 1))
        elif isinstance(defaults.get(part), bool):
            key, value = part, "true"
        elif bare_key is not None:
            key, value = bare_key, part
        else:
            raise ConfigError(f"{where}: argument {part!r} is not key=value; keys: {sorted(defaults)}")
        if key not in defaults:
            raise ConfigError(f"{where}: unknown key {key!r}; choose from {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            out[key] = value.lower() in _TRUE
            continue
        try:
            out[key] = type(default)(value)
        except ValueError:
            raise ConfigError(f"{where}: {key}={value!r} does not parse as {type(default).__name__} "
                              f"(default {default!r})") from None
    return out


# ------------------------------------------------------------------------------------------------------ variants


def _space_to_depth(*, time_factor: int, space_factor: int, scaling_factor: float = 1.0,
                    shift_factor: float = 0.0) -> dict[str, Any]:
    """The exact, parameter-free autoencoder: pixels (s x s x t patches) become channels, then
    `(pixels - shift_factor) * scaling_factor` (1 and 0: the raw pixels, the round trip bit-exact)."""
    return {"name": "space_to_depth", "time_factor": time_factor, "space_factor": space_factor,
            "latent_channels": 3 * space_factor**2 * time_factor, "scaling_factor": scaling_factor,
            "shift_factor": shift_factor}


def _vae(name: str, *, latent_channels: int, time_factor: int, space_factor: int) -> dict[str, Any]:
    """A VAE from a user path (`autoencoder.path`): its latent normalisation is its weights' config.json's, so
    `scaling_factor` / `shift_factor` stay 1 and 0 here."""
    return {"name": name, "latent_channels": latent_channels, "time_factor": time_factor,
            "space_factor": space_factor, **IDENTITY_LATENT_NORM}


def _word_t5(*, d_model: int, num_heads: int, d_kv: int, d_ff: int) -> dict[str, Any]:
    """A small T5, randomly initialised and frozen, over hashed words (`models/tokenizer.py:WordTokenizer`): no files.
    2048 ids keep the synthetic prompts' 50 words apart (at 1024 "up" and "down" share an id)."""
    return {"name": "t5", "vocab_size": 2048, "d_model": d_model, "num_layers": 2, "num_heads": num_heads,
            "d_kv": d_kv, "d_ff": d_ff, "per_layer_bias": False, "tokenizer": "word",
            # words: the synthetic captions run to <= 60, motion prompts <= 48, local prompts <= 14
            "max_length": 64, "local_max_length": 16, "dtype": "float32"}


UNET_CROSS_DOWN, UNET_PLAIN_DOWN = "CrossAttnDownBlockMotion", "DownBlockMotion"
UNET_CROSS_UP, UNET_PLAIN_UP = "CrossAttnUpBlockMotion", "UpBlockMotion"
# `config.model.unet` keys that fix the U-Net's parameter shapes (a resume must keep them; `assembly/registry.py`)
UNET_STATE_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                   "num_attention_heads", "cross_attention_dim", "norm_num_groups", "transformer_layers_per_block",
                   "use_linear_projection", "mid_block_layers", "use_motion_mid_block", "motion_num_attention_heads",
                   "temporal_transformer_layers_per_block", "temporal_transformer_layers_per_mid_block",
                   "ttm_qk_norm")


def _unet(**overrides: Any) -> dict[str, Any]:
    """`config.model.unet` of a U-Net variant (`backbone="unet"`, `ttm_jax/models/unet.py`): the architecture, by
    default SD 1.5's U-Net + AnimateDiff V3's motion modules (no motion mid block), 1,276,658,564 parameters as
    diffusers' `UNetMotionModel`. The U-Net's fields live in this sub-section so that DiT variants carry none of them
    (and U-Net variants none of the DiT's `dim`, `num_layers`, ...); the fields shared with the DiT (`ttm_layers`,
    `ttm_masked*`, `attention`, `attention_sparse`, `remat_policy`, `dtype`, `param_dtype`, `cross_ids_from`,
    `condition_frames`) stay in `config.model`."""
    u = {"block_out_channels": (320, 640, 1280, 1280),
         "down_block_types": (UNET_CROSS_DOWN,) * 3 + (UNET_PLAIN_DOWN,),
         "up_block_types": (UNET_PLAIN_UP,) + (UNET_CROSS_UP,) * 3,
         "layers_per_block": 2, "num_attention_heads": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
         "norm_eps": 1e-5, "transformer_layers_per_block": 1, "use_linear_projection": False,
         "mid_block_scale_factor": 1.0, "mid_block_layers": 1, "use_motion_mid_block": False,
         "motion_num_attention_heads": 8, "motion_max_seq_length": 32, "temporal_transformer_layers_per_block": 1,
         "temporal_transformer_layers_per_mid_block": 1,
         # TTM's added layers: masked self-attention over every frame's tokens of an object ("spatio-temporal"),
         # False: within each frame; RMS norms on their q and k
         "ttm_self_across_frames": True, "ttm_qk_norm": True,
         # diffusers folders `python -m ttm_jax.convert --from=diffusers-unet:PATH[,motion_adapter:PATH]` reads
         # (SD 1.5's unet/ + the MotionAdapter, or one UNetMotionModel folder); training starts from the converted
         # checkpoint (`train.init_from`), so these only document where it came from
         "pretrained_unet": "", "pretrained_motion_adapter": ""}
    unknown = set(overrides) - set(u)
    if unknown:
        raise ConfigError(f"config.model.unet: unknown keys {sorted(unknown)}; choose from {sorted(u)}")
    u.update(overrides)
    return u


def _clip_l14(*, local_max_length: int) -> dict[str, Any]:
    """CLIP ViT-L/14's text tower (SD 1.5 / AnimateDiff), from `text_encoder.path` (a transformers CLIP folder or a
    diffusers pipeline's `text_encoder/`) with its BPE tokenizer (`tokenizer_path`: the folder with vocab.json)."""
    return {"name": "clip", "vocab_size": 49408, "d_model": 768, "num_layers": 12, "num_heads": 12, "d_kv": 64,
            "d_ff": 3072, "per_layer_bias": False, "tokenizer": "clip", "max_length": 77,
            "local_max_length": local_max_length, "dtype": "float32"}


# variant -> section -> the values that differ between variants (every other value: the section builders below).
# Every entry sets the same keys.
_VARIANT_TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        # A token must carry fewer values (latent channels x patch volume) than the model has dims, or the output
        # head is a bottleneck that cannot represent the per-pixel noise it must remove (Wan: 64 values, dim 1536).
        # The tiny config's exact space_to_depth latent has 48 channels, so it patchifies 1x1x1 (48 values, dim 128).
        "model": {"dim": 128, "num_layers": 2, "num_heads": 2, "ffn_dim": 256, "text_dim": 32, "freq_dim": 32,
                  "ttm_layers": 1, "patch_size": (1, 1, 1)},
        "autoencoder": _space_to_depth(time_factor=4, space_factor=2),
        "text_encoder": _word_t5(d_model=32, num_heads=2, d_kv=16, d_ff=64),
        # latent 3 x 16 x 16 x 48: 768 tokens. 6 fps: every clip frame is an annotated SA-V frame (the masks are
        # exact on every frame, no staircase). Synthetic data on the binding rung of the ladder (docs/results.md);
        # 1,000 videos: about a minute to generate and prepare, once per workdir parent
        "data": {"num_frames": 9, "height": 32, "width": 32, "fps": 6.0, "synthetic_rung": 3,
                 "synthetic_num_videos": 1000},
        # ~2 minutes on a 2-core CPU (the README's first command)
        "train": {"batch_size": 4, "total_steps": 600, "checkpoint_every_steps": 100, "sample_every_steps": 300},
        # tiny runs learn faster with a larger learning rate than the paper's
        "optim": {"learning_rate": 1e-3, "warmup_steps": 20},
        "objective": {"name": "rectified_flow", "shift": 1.0},
        "sample": {"num_steps": 20, "text_scale": 3.0},
    },
    "mid": {
        "model": {"dim": 512, "num_layers": 8, "num_heads": 4, "ffn_dim": 1536, "text_dim": 256, "freq_dim": 256,
                  "ttm_layers": 3, "patch_size": (1, 2, 2)},
        "autoencoder": _space_to_depth(time_factor=4, space_factor=4),
        "text_encoder": _word_t5(d_model=256, num_heads=4, d_kv=64, d_ff=512),
        "data": {"num_frames": 17, "height": 128, "width": 128, "fps": 12.0, "synthetic_rung": 4,
                 "synthetic_num_videos": 64},
        "train": {"batch_size": 8, "total_steps": 2000, "checkpoint_every_steps": 100, "sample_every_steps": 300},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 20},
        "objective": {"name": "rectified_flow", "shift": 3.0},
        "sample": {"num_steps": 20, "text_scale": 3.0},
    },
    "wan1.3b": {
        # The paper adds masked layers to 10 of 40 DiT blocks; the same quarter of Wan-1.3B's 30 is 8.
        "model": {"dim": 1536, "num_layers": 30, "num_heads": 12, "ffn_dim": 8960, "text_dim": 4096, "freq_dim": 256,
                  "ttm_layers": 8, "patch_size": (1, 2, 2)},
        "autoencoder": _vae("wan", latent_channels=16, time_factor=4, space_factor=8),
        # umT5-XXL encoder, as Wan 2.1
        "text_encoder": {"name": "umt5", "vocab_size": 256384, "d_model": 4096, "num_layers": 24, "num_heads": 64,
                         "d_kv": 64, "d_ff": 10240, "per_layer_bias": True, "tokenizer": "sentencepiece",
                         "max_length": 512, "local_max_length": 32, "dtype": "bfloat16"},
        "data": {"num_frames": 81, "height": 480, "width": 832, "fps": 12.0, "synthetic_rung": 4,
                 "synthetic_num_videos": 64},
        "train": {"batch_size": 32, "total_steps": 50_000, "checkpoint_every_steps": 1000, "sample_every_steps": 5000},
        # paper: constant LR 2e-5 after 2,000 warm-up steps
        "optim": {"learning_rate": 2e-5, "warmup_steps": 2000},
        "objective": {"name": "rectified_flow", "shift": 3.0},
        "sample": {"num_steps": 50, "text_scale": 5.0},
    },
    "wan14b": {
        # The shapes of Wan2.1-T2V-14B (and of I2V-14B's DiT, less its CLIP image embedder and 36 input channels):
        # the config.json of Wan-AI/Wan2.1-T2V-14B-Diffusers as diffusers' WanTransformer3DModel reads it (its
        # defaults in diffusers 0.42.1 transformer_wan.py are these 14B numbers: 40 heads of 128 = dim 5120, FFN
        # 13824, 40 layers, text dim 4096, freq dim 256, patch (1, 2, 2), 16 latent channels in and out). TTM's added
        # layers in 10 of the 40 blocks, as the paper. The VAE and umT5-XXL are wan1.3b's.
        "model": {"dim": 5120, "num_layers": 40, "num_heads": 40, "ffn_dim": 13824, "text_dim": 4096, "freq_dim": 256,
                  "ttm_layers": 10, "patch_size": (1, 2, 2)},
        "autoencoder": _vae("wan", latent_channels=16, time_factor=4, space_factor=8),
        "text_encoder": {"name": "umt5", "vocab_size": 256384, "d_model": 4096, "num_layers": 24, "num_heads": 64,
                         "d_kv": 64, "d_ff": 10240, "per_layer_bias": True, "tokenizer": "sentencepiece",
                         "max_length": 512, "local_max_length": 32, "dtype": "bfloat16"},
        # Wan 14B's 720p: 81 frames at 720x1280 (21 x 45 x 80 latent patches: 75,600 tokens)
        "data": {"num_frames": 81, "height": 720, "width": 1280, "fps": 12.0, "synthetic_rung": 4,
                 "synthetic_num_videos": 64},
        "train": {"batch_size": 32, "total_steps": 50_000, "checkpoint_every_steps": 1000, "sample_every_steps": 5000},
        "optim": {"learning_rate": 2e-5, "warmup_steps": 2000},
        # diffusers pipeline_wan.py example: flow_shift 5.0 for 720P (3.0 for 480P)
        "objective": {"name": "rectified_flow", "shift": 5.0},
        "sample": {"num_steps": 50, "text_scale": 5.0},
    },
    # U-Net variants (`backbone="unet"`): the model section is {backbone, ttm_layers, unet: `_unet(...)`}; every other
    # section has the same keys as the DiT variants'.
    "tiny_unet": {
        # 2 levels (16x16 and 8x8 latent cells), the first spatial transformer with TTM's layers. The latent is per
        # frame, as SD's VAE (12 values per cell: 2 x 2 pixels x RGB, 9 latent frames): with tiny's time-grouped latent
        # (4 frames in 48 channels) this U-Net learned to predict the clean latent from the conditions and ignored the
        # noisy input (README, Models). Masked self-attention per frame: 256 tokens (across frames: 2,304).
        "model": {"backbone": "unet", "ttm_layers": 1,
                  "unet": _unet(block_out_channels=(64, 128), down_block_types=(UNET_CROSS_DOWN, UNET_PLAIN_DOWN),
                                up_block_types=(UNET_PLAIN_UP, UNET_CROSS_UP), layers_per_block=1,
                                num_attention_heads=2, cross_attention_dim=32, norm_num_groups=16,
                                motion_num_attention_heads=2, motion_max_seq_length=16,
                                ttm_self_across_frames=False)},
        # latents of about unit variance, as SD's VAE scales its (0.18215): the synthetic SA-V pixels have mean -0.46
        # and std 0.24 in [-1, 1]; at the raw scale the 20-step DDIM samples were still noise at step 300
        "autoencoder": _space_to_depth(time_factor=1, space_factor=2, scaling_factor=4.0, shift_factor=-0.46),
        "text_encoder": _word_t5(d_model=32, num_heads=2, d_kv=16, d_ff=64),
        "data": {"num_frames": 9, "height": 32, "width": 32, "fps": 12.0, "synthetic_rung": 4,
                 "synthetic_num_videos": 64},
        "train": {"batch_size": 4, "total_steps": 600, "checkpoint_every_steps": 100, "sample_every_steps": 300},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 20},
        "objective": {"name": "ddim_v", "shift": 1.0},
        "sample": {"num_steps": 20, "text_scale": 3.0},
    },
    "animatediff": {
        # the paper's U-Net: SD 1.5 + AnimateDiff V3 (512x512, 16 frames), TTM's layers in all 6 spatial transformers
        # of the encoder; SD 1.5's VAE per frame and CLIP ViT-L/14 (text_encoder.path, autoencoder.path: diffusers /
        # transformers folders); zero-terminal-SNR v-prediction with trailing DDIM (objective section's defaults)
        "model": {"backbone": "unet", "ttm_layers": 6, "unet": _unet()},
        "autoencoder": _vae("sd", latent_channels=4, time_factor=1, space_factor=8),
        "text_encoder": _clip_l14(local_max_length=32),
        "data": {"num_frames": 16, "height": 512, "width": 512, "fps": 12.0, "synthetic_rung": 4,
                 "synthetic_num_videos": 64},
        # run size as wan1.3b's (paper: constant LR after warm-up)
        "train": {"batch_size": 32, "total_steps": 50_000, "checkpoint_every_steps": 1000, "sample_every_steps": 5000},
        "optim": {"learning_rate": 2e-5, "warmup_steps": 2000},
        "objective": {"name": "ddim_v", "shift": 1.0},
        # 25 DDIM steps (AnimateDiff's default); SD 1.5's text guidance scale
        "sample": {"num_steps": 25, "text_scale": 7.5},
    },
}
VARIANTS = tuple(_VARIANT_TABLE)

# A stage's own values over its variant's row, by (stage, variant) (section -> values; a section given here replaces
# those keys only). The tiny stages are what climbed the ladder (docs/results.md, "Stage 1, rung by rung"): a
# per-frame latent (12 values per 2x2 pixels, normalised to about unit variance) with 2x2 patches (576 tokens), DDIM
# v-prediction with zero terminal SNR trained mostly at high noise (`objective.shift`: where the layout is decided)
# and a learning rate that falls to 0 over the second half. Stage 1 (6 layers, shift 12) generates the layout; stage 2
# and the TI2V baseline (the same backbone, for Table 3) paint it (4 layers, shift 4).
_PER_FRAME_LATENT = _space_to_depth(time_factor=1, space_factor=2, scaling_factor=4.0, shift_factor=-0.46)
_TINY_VIDEO_STAGE = {
    "model": {"num_layers": 4, "patch_size": (1, 2, 2)},
    "autoencoder": _PER_FRAME_LATENT,
    "train": {"total_steps": 1500, "checkpoint_every_steps": 500, "sample_every_steps": 750},
    "optim": {"cooldown_fraction": 0.5},
    "objective": {"name": "ddim_v", "shift": 4.0},
}
_STAGE_ROWS: dict[tuple[int, str], dict[str, dict[str, Any]]] = {
    (1, "tiny"): {
        # TTM's added layers (in the first block), their masked cross-attention giving each object's starting place
        # its local prompt in every latent frame: what made stage 1 bind (docs/results.md, run J)
        "model": {"num_layers": 6, "patch_size": (1, 2, 2), "ttm_layers": 1, "stage1_later_ids": "start"},
        "autoencoder": _PER_FRAME_LATENT,
        "train": {"total_steps": 2000, "checkpoint_every_steps": 500, "sample_every_steps": 1000},
        "optim": {"cooldown_fraction": 0.5},
        "objective": {"name": "ddim_v", "shift": 12.0},
    },
    (2, "tiny"): _TINY_VIDEO_STAGE,
    (0, "tiny"): _TINY_VIDEO_STAGE,
}

# `runlocal`: the run-size values it sets (data shape: `_runlocal`). Small enough for seconds on a CPU, large enough
# to pass through every part of the loop: several steps, a checkpoint mid-run and at the end, one round of samples.
# the synthetic generator's ladder rungs (ttm_jax/data/synthetic.py RUNGS; a test keeps the two equal)
SYNTHETIC_RUNGS = (1, 2, 3, 4)
SYNTHETIC_FULL_RUNG = 4

_RUNLOCAL: dict[str, dict[str, Any]] = {
    "data": {"synthetic_num_videos": 8},
    "train": {"batch_size": 2, "total_steps": 8, "checkpoint_every_steps": 4, "log_every_steps": 1,
              "sample_every_steps": 8, "compiler_options": {"xla_backend_optimization_level": 0}},
    "optim": {"warmup_steps": 2},
    "sample": {"num_steps": 2},
}
_RUNLOCAL_SIDE = 32  # pixels: the largest height and width of a runlocal clip


# ---------------------------------------------------------------------------------------------- section builders
# Each takes its section of a `_VARIANT_TABLE` entry and adds the values common to all variants.


def _model(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(dict(v))
    m.backbone = v.get("backbone", "dit")  # the trained model, by name (assembly/registry.py: BACKBONES)
    m.rope_max_seq_len = 1024
    m.eps = 1e-6
    m.qk_norm = True  # RMSNorm across heads on q and k, as Wan 2.1
    m.cross_attn_norm = True  # affine LayerNorm before cross-attention, as Wan 2.1
    # TTM added layers in the first `ttm_layers` blocks, and which of them are masked (the paper's Table 3 rows):
    # both (TTM); ttm_masked=False: neither ("no masked attention"); ttm_masked_self=False: "masked cross-attention
    # only"; ttm_masked_cross=False: "masked self-attention only". The single-stage TI2V baseline is stage 0.
    m.ttm_masked = True
    m.ttm_masked_self = True
    m.ttm_masked_cross = True
    # first-frame conditions in latent frame 0 only (Wan I2V), in every frame (SVD: all), or in every frame with a
    # channel holding the frame's place (indexed); stage 1: all (build)
    m.condition_frames = "first"
    # self-conditioning (Chen et al. 2023, "Analog Bits"): the model also reads its own clean estimate of the previous
    # sampling step (training: of a first, gradient-free pass on half the examples; zeros otherwise), in
    # `latent_channels` more input channels after the noisy latent
    m.self_condition = False
    m.cross_ids_from = "bbox"  # per-token ids for masked cross-attention: objects' boxes (paper) or masks
    m.attention = "xla"  # xla (reference) | splash (TPU) | gpu (Pallas Triton)
    # masked self-attention over tokens sorted by object id, only the (query block, key block) pairs of one object:
    # exact, work sum_k n_k^2 instead of N^2 (ttm_jax/models/sparse_attention.py); any backend
    m.attention_sparse = False
    # attention with the video tokens sharded over mesh.context > 1 (ttm_jax/models/context_parallel.py): ulysses
    # (all-to-all to head groups; heads per tensor shard divisible by mesh.context) | ring (any head count)
    m.context_impl = "ulysses"
    m.scan_layers = True
    # scanned blocks per loop iteration; 0: per backend (all of them on CPU, no loop; 1 on GPU / TPU): dit.unroll_for
    m.scan_unroll = 0
    m.remat_policy = "none"
    m.dtype = "float32"  # compute dtype; bfloat16 on accelerators
    m.param_dtype = "float32"
    return m


def _autoencoder(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    a = ml_collections.ConfigDict(dict(v))
    a.path = ""  # Wan / SD VAE: a diffusers AutoencoderKLWan / AutoencoderKL folder; unused by space_to_depth
    a.dtype = "float32"  # Wan VAE compute dtype (params stay float32); bfloat16 on accelerators
    a.chunk_frames = 1  # Wan VAE: latent frames per causal time chunk (memory ~ chunk); 0: whole clip in one pass
    # `scaling_factor`, `shift_factor` (the table's): space_to_depth latent = (pixels - shift_factor) *
    # scaling_factor (diffusers' names); the SD and Wan VAEs normalise as their weights' config.json says (1 and 0)
    return a


def _text_encoder(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `dtype`: compute dtype (norms and softmax stay float32); parameters are stored in param_dtype
    t = ml_collections.ConfigDict(dict(v))
    t.relative_attention_num_buckets = 32
    t.relative_attention_max_distance = 128
    t.feed_forward = "gated-gelu"
    t.eps = 1e-6
    t.tokenizer_path = ""  # sentencepiece model file, for tokenizer=sentencepiece
    t.path = ""  # converted weights; empty: random init from `seed` (tiny configs)
    # tokens per local prompt (words: "the red striped square drifts up and to the left while growing" ~ 14)
    t.local_max_length = v["local_max_length"]
    t.param_dtype = "float32"
    return t


def _data(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `fps`: clip frame rate sampled from SA-V's 24 fps videos (6: every frame an annotated one); `synthetic_rung`:
    # the synthetic data's rung on the ladder of difficulty (ttm_jax/data/synthetic.py RUNGS): 1 one plain object at
    # a prompted speed, 2 at a random speed, 3 two or three objects with their own directions (binding), 4 the full set
    d = ml_collections.ConfigDict(dict(v))
    d.max_objects = 4  # K: objects per clip (background is id 0 and not counted)
    d.annotation = "manual"  # manual | auto | both
    d.sav_path = ""  # SA-V train shards or folders; empty: synthetic SA-V in `synthetic_dir`
    d.captions = ""  # captions sidecar JSONL
    d.prepared_path = ""  # ArrayRecord shards from `python -m ttm_jax.data.prepare`
    d.synthetic_dir = ""  # empty: <workdir>/../synthetic_sav cache
    d.missing_captions = "skip"  # skip | error
    d.crop = "center"  # center | random: where the crop box of the output aspect sits in the source frame
    d.min_object_area = 0.002  # an object must cover this fraction of the clip's first frame to be chosen
    d.motion_weight = 1.0  # object choice score = mean area x (1 + motion_weight x (1 - consecutive-frame IoU))
    d.shuffle_seed = 0
    d.num_workers = 0  # Grain worker processes (mp_prefetch); 0: decode in the training process
    d.read_threads = 4  # Grain threads reading and decoding records in each process (0: the main thread, no read-ahead)
    # True: `prepared_path` is a folder of `python -m ttm_jax.data.encode` (cached VAE latents and text embeddings);
    # the train step then runs neither the autoencoder's encoder nor the text encoder (not even loaded)
    d.cached = False
    return d


def _train(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `batch_size`: global batch; `sample_every_steps`: sample videos (mp4) at intervals, 0: never
    t = ml_collections.ConfigDict(dict(v))
    t.grad_accum_steps = 1
    t.keep_checkpoints = 3  # keep the last N ...
    t.keep_period = 10_000  # ... and every M-th step
    t.log_every_steps = 10
    t.init_from = ""  # Orbax checkpoint (e.g. from `python -m ttm_jax.convert`) to start the weights from
    t.async_checkpointing = True  # Orbax writes while training continues
    t.tensorboard = True  # scalars under <workdir>/tensorboard (tensorboardX)
    # XLA options for the compiled step, e.g. {"xla_backend_optimization_level": 0}: much faster CPU compiles
    t.compiler_options = ml_collections.ConfigDict()
    return t


def _optim(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict(dict(v))
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.weight_decay = 0.0
    o.grad_clip_norm = 1.0
    o.ema_decay = 0.0  # 0: no EMA
    # warmup-stable-decay: the learning rate falls linearly to 0 over the last `cooldown_steps` of train.total_steps
    # (0: constant to the end). To cool down a finished constant-LR run, resume it with total_steps raised by N and
    # cooldown_steps=N: the fall then starts at the step it resumes from (the loop prints the LR it resumes at).
    o.cooldown_steps = v.get("cooldown_steps", 0)
    # or, when cooldown_steps is 0, the fall as a share of train.total_steps (the tiny stages: 0.5), so a run
    # shortened or lengthened on the command line keeps it; `cooldown_steps(optim, total_steps)` resolves the two
    o.cooldown_fraction = v.get("cooldown_fraction", 0.0)
    return o


def cooldown_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
    """The steps over which the learning rate falls to 0 (`config.optim`): `cooldown_steps`, else `cooldown_fraction`
    of `total_steps` (`train.total_steps`), kept after the warm-up."""
    if optim.get("cooldown_steps", 0):
        return int(optim.cooldown_steps)
    share = float(optim.get("cooldown_fraction", 0.0))
    return min(round(share * int(total_steps)), max(0, int(total_steps) - int(optim.warmup_steps))) if share else 0


def _objective(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    # `shift`: timestep shift t' = s t / (1 + (s - 1) t)
    j = ml_collections.ConfigDict(dict(v))
    j.name = v.get("name", "rectified_flow")  # the objective, by name (assembly/objectives.py: OBJECTIVES)
    # rectified_flow: training times and the time shift
    j.t_sampling = "logit_normal"  # logit_normal | uniform
    j.logit_mean, j.logit_std = 0.0, 1.0
    # ddim_v (ttm_jax/diffusion/ddim.py): DDPM betas, zero terminal SNR, DDIM timestep spacing (AnimateDiff / SD 1.5)
    j.num_train_timesteps = 1000
    j.beta_start, j.beta_end = 0.00085, 0.012
    j.beta_schedule = "scaled_linear"  # scaled_linear | linear
    j.rescale_zero_terminal_snr = True
    j.timestep_spacing = "trailing"  # trailing | leading | linspace
    # condition dropout for InstructPix2Pix guidance
    j.drop_image_prob = 0.05
    j.drop_text_prob = 0.05
    j.drop_both_prob = 0.05
    return j


def _mesh(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    h = ml_collections.ConfigDict(dict(v))
    # one size may be -1: "all remaining devices"
    h.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    h.distributed = "auto"  # auto | skip  (jax.distributed.initialize from the environment)
    # devices the video tokens are split over: the mesh's `context` axis (context parallelism, model.context_impl);
    # mesh.shape's sizes then fill devices // context. 1: none
    h.context = 1
    # logical axis name -> mesh axes, in priority order (ttm_jax/runtime/sharding.py); params' `embed` is sharded over
    # fsdp and context (the devices that split the sequence hold a share of the weights too; context 1: fsdp alone),
    # heads and FFN hidden are tensor-parallel, the batch is split over data x fsdp, the video tokens over context
    # (text and local prompts, kv_length, replicated)
    h.rules = (("batch", ("data", "fsdp")), ("embed", ("fsdp", "context")), ("heads", "tensor"), ("mlp", "tensor"),
               ("text_embed", None), ("in_channels", None), ("out_channels", None), ("modulation", None),
               ("layers", None), ("length", "context"), ("kv_length", None))
    h.shard_unannotated = True  # params without logical names: FSDP-shard the large ones on their largest dim
    return h


def _sample(v: Mapping[str, Any]) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict(dict(v))
    s.schedule = "linear_quadratic"  # linear_quadratic (Movie Gen) | uniform
    s.image_scale = 1.5
    s.seed = 0
    return s


# section name -> builder, in the config's order
_SECTIONS: dict[str, Callable[[Mapping[str, Any]], ml_collections.ConfigDict]] = {
    "model": _model, "autoencoder": _autoencoder, "text_encoder": _text_encoder, "data": _data, "train": _train,
    "optim": _optim, "objective": _objective, "mesh": _mesh, "sample": _sample,
}


def _runlocal(c: ml_collections.ConfigDict) -> None:
    """Shrink `c` in place to a tiny, fast local run of its variant (module docstring): `_RUNLOCAL`, plus the
    shortest clip with motion (2 latent frames, rounded up to the time patch) of at most `_RUNLOCAL_SIDE` pixels."""
    for section, values in _RUNLOCAL.items():
        c[section].update(values)
    a, d, patch = c.autoencoder, c.data, grid_step(c)
    latent_frames = patch[0] * math.ceil(2 / patch[0])
    d.num_frames = min(d.num_frames, 1 + (latent_frames - 1) * a.time_factor)
    for name, p in (("height", patch[1]), ("width", patch[2])):
        step = a.space_factor * p
        d[name] = min(d[name], step * math.ceil(_RUNLOCAL_SIDE / step))


# config.stage -> (what the stage is, how many condition latents its model input carries besides the noisy one)
STAGES = {
    1: ("image-to-motion: first frame + first-frame masks + motion prompt -> trajectory", 2),
    2: ("motion-to-video: first frame + trajectory + caption + local prompts -> video", 2),
    0: ("single-stage TI2V baseline: first frame + caption (+ local prompts, unmasked) -> video, no trajectory", 1),
}


def build(stage: int, arg: str | None = None) -> ml_collections.ConfigDict:
    """The full default config of `stage` (`STAGES`: 1 image-to-motion, 2 motion-to-video, 0 the single-stage TI2V
    baseline) for the variant in `arg`, shrunk to a local run when `arg` holds `runlocal` (module docstring)."""
    args = parse_arg(arg)
    variant = args["variant"]
    if variant not in VARIANTS:
        raise ConfigError(f"config argument: unknown variant {variant!r}; choose one of {VARIANTS}")
    row = _VARIANT_TABLE[variant]
    over = _STAGE_ROWS.get((stage, variant), {})
    row = {k: {**row.get(k, {}), **over.get(k, {})} for k in {*row, *over}}
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.variant = variant
    c.seed = 0
    for section, make in _SECTIONS.items():
        c[section] = make(row.get(section, {}))
    if stage == 1:
        # the paper's stage 1 reads the motion prompt only; `model.ttm_layers > 0` adds layers whose masked
        # cross-attention gives each object's first-frame tokens its local prompt (tokens of later frames: slot 0),
        # and whose self-attention is unmasked (the objects' later places are what stage 1 generates)
        # (a stage-1 row may add them: the tiny stage 1 has them in its first block, `_STAGE_ROWS`)
        c.model.ttm_layers = over.get("model", {}).get("ttm_layers", 0)
        c.model.ttm_masked_self = False
        # which local prompt the added layers give the tokens of latent frames 1+: "background" (slot 0) or "start"
        # (the first frame's ids in every frame: each object's starting place reads its local prompt, as s0 sits in
        # every latent frame with condition_frames="all")
        c.model.stage1_later_ids = over.get("model", {}).get("stage1_later_ids", "background")
        # E(x0), E(s0) in every latent frame: frames 1+ of a trajectory have no other local condition
        # (ttm_jax/models/conditioning.py)
        c.model.condition_frames = "all"
    if stage == 0:
        # TI2V: stage 2's added layers, unmasked (there are no object ids without a trajectory)
        c.model.ttm_masked = False
    if args["runlocal"]:
        _runlocal(c)
    return c


def set_total_steps(config: ml_collections.ConfigDict, steps: int) -> None:
    """Sets `train.total_steps` and keeps the variant's fall of the learning rate inside the new run: at most half of
    it, and after the warm-up (`optim.cooldown_steps` 0 stays 0; a `cooldown_fraction` keeps its share by itself)."""
    o = config.optim
    o.cooldown_steps = min(int(o.cooldown_steps), steps // 2, max(0, steps - int(o.warmup_steps)))
    config.train.total_steps = steps


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(T', H', W', C) of one clip's latent under the config's autoencoder (causal time compression)."""
    a, d = config.autoencoder, config.data
    t = 1 + (d.num_frames - 1) // a.time_factor
    return t, d.height // a.space_factor, d.width // a.space_factor, a.latent_channels


def in_channels(config: ml_collections.ConfigDict) -> int:
    """Channels into the DiT: the noisy latent plus the stage's conditions (`STAGES`: two for stages 1 and 2, one for
    TI2V) and the self-conditioning estimate of `model.self_condition`, each `latent_channels` wide, plus the
    frame-place channel of `model.condition_frames=indexed`."""
    extra = frame_place_channels(config.model.get("condition_frames", "first"))
    latents = 1 + STAGES[int(config.stage)][1] + int(self_condition(config))
    return latents * config.autoencoder.latent_channels + extra


def self_condition(config: ml_collections.ConfigDict) -> bool:
    """`config.model.self_condition` (False for configs saved before the field existed)."""
    return bool(config.model.get("self_condition", False))


def frame_place_channels(condition_frames: str) -> int:
    """Channels the stage input adds beyond the latents for `model.condition_frames` (`indexed`: the frame's place,
    `conditioning.stage_input`)."""
    return 1 if condition_frames == "indexed" else 0


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def _check_model(config: ml_collections.ConfigDict) -> None:
    """model section: the fields shared by every backbone, then the backbone's own (`model.backbone`: the DiT's,
    ttm_jax/models/dit.py; the U-Net's `model.unet`, ttm_jax/models/unet.py), and their agreement with the stage and
    the text encoder. Other backbones (registered elsewhere, e.g. in tests) check their own fields."""
    m = config.model
    _check(isinstance(m.ttm_layers, int) and m.ttm_layers >= 0, "model.ttm_layers",
           f"{m.ttm_layers!r} must be an int >= 0")
    _check(m.attention in ATTENTION_IMPLS, "model.attention", f"{m.attention!r}; choose one of {ATTENTION_IMPLS}")
    _check(isinstance(m.get("attention_sparse", False), bool), "model.attention_sparse",
           f"{m.get('attention_sparse')!r} must be True or False")
    _check(m.get("context_impl", "ulysses") in ("ulysses", "ring"), "model.context_impl",
           f"{m.get('context_impl')!r}; choose ulysses (all-to-all over heads) or ring (keys passed around the ring)")
    _check(m.remat_policy in REMAT_POLICIES, "model.remat_policy",
           f"{m.remat_policy!r}; choose one of {REMAT_POLICIES}")
    _check(isinstance(m.get("scan_unroll", 0), int) and m.get("scan_unroll", 0) >= 0, "model.scan_unroll",
           f"{m.get('scan_unroll')!r} must be an int >= 0 (0: per backend, all blocks unrolled on CPU)")
    _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r}; choose one of {DTYPES}")
    _check(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r}; choose one of {DTYPES}")
    _check(m.get("condition_frames", "first") in CONDITION_FRAMES, "model.condition_frames",
           f"{m.get('condition_frames')!r}; choose first (latent frame 0, zeros after), all (every latent frame) or "
           f"indexed (every latent frame, and a channel with the frame's place)")
    _check(isinstance(m.get("self_condition", False), bool), "model.self_condition",
           f"{m.get('self_condition')!r} must be True or False")
    _check(m.cross_ids_from in CROSS_IDS_FROM, "model.cross_ids_from",
           f"{m.cross_ids_from!r}; choose one of {CROSS_IDS_FROM}")
    _check(config.stage != 1 or m.ttm_layers == 0 or not (m.ttm_masked and m.ttm_masked_self),
           "model.ttm_masked_self",
           f"True with model.ttm_layers={m.ttm_layers} in stage 1: stage 1 knows the objects' ids in the first frame "
           "only (their later places are what it generates), so its added self-attention cannot be masked; set "
           "model.ttm_masked_self=False (its masked cross-attention gives each object's first-frame tokens its "
           "local prompt), or model.ttm_layers=0")
    _check(m.get("stage1_later_ids", "background") in STAGE1_LATER_IDS, "model.stage1_later_ids",
           f"{m.get('stage1_later_ids')!r}; choose one of {STAGE1_LATER_IDS}")
    _check(config.stage != 0 or not m.ttm_masked, "model.ttm_masked",
           "True but the TI2V baseline (stage 0) has no trajectory, so no object ids to mask with; set False")
    backbone = m.get("backbone", "dit")
    if backbone == "dit":
        _check_dit(config)
    elif backbone == "unet":
        _check_unet(config)


def _check_dit(config: ml_collections.ConfigDict) -> None:
    """The DiT's fields (ttm_jax/models/dit.py)."""
    m, t = config.model, config.text_encoder
    for name in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim"):
        _check(isinstance(m[name], int) and m[name] > 0, f"model.{name}", f"{m[name]!r} must be a positive int")
    _check(m.dim % m.num_heads == 0, "model.dim",
           f"{m.dim} is not divisible by model.num_heads={m.num_heads}; pick a dim that is")
    head_dim = m.dim // m.num_heads
    _check(head_dim % 2 == 0 and head_dim >= 6, "model.num_heads",
           f"head dim {head_dim} (dim/num_heads) must be even and >= 6 for 3D RoPE")
    _check(m.freq_dim % 2 == 0, "model.freq_dim", f"{m.freq_dim} must be even (sin and cos halves)")
    _check(0 <= m.ttm_layers <= m.num_layers, "model.ttm_layers",
           f"{m.ttm_layers} must be in [0, model.num_layers={m.num_layers}]")
    _check(len(tuple(m.patch_size)) == 3 and all(int(p) > 0 for p in m.patch_size), "model.patch_size",
           f"{m.patch_size!r} must be three positive ints (t, h, w)")
    _check(m.text_dim == t.d_model, "model.text_dim",
           f"{m.text_dim} but text_encoder.d_model={t.d_model}; the DiT's text embedder reads the encoder's output, "
           f"set model.text_dim={t.d_model}")


def _per_level(value: Any, n: int, field: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(value) if isinstance(value, list | tuple) else ()
    _check(len(out) == n and all(isinstance(v, int) for v in out), f"model.unet.{field}",
           f"{value!r} must be an int or one int per level ({n}, as model.unet.block_out_channels)")
    return out


def _check_unet(config: ml_collections.ConfigDict) -> None:
    """The U-Net's fields `model.unet` (ttm_jax/models/unet.py), against the text encoder and the latent grid."""
    m, t = config.model, config.text_encoder
    _check("unet" in m, "model.unet", "missing; a backbone='unet' config needs the U-Net section (config.py: _unet)")
    u = m.unet
    chans = tuple(u.block_out_channels)
    n = len(chans)
    _check(n >= 1 and all(isinstance(c, int) and c > 0 for c in chans), "model.unet.block_out_channels",
           f"{u.block_out_channels!r} must be positive ints, one per level")
    down, up = tuple(u.down_block_types), tuple(u.up_block_types)
    _check(len(down) == n and all(k in (UNET_CROSS_DOWN, UNET_PLAIN_DOWN) for k in down),
           "model.unet.down_block_types", f"{down!r}: one per level, each {UNET_CROSS_DOWN} or {UNET_PLAIN_DOWN}")
    _check(len(up) == n and all(k in (UNET_CROSS_UP, UNET_PLAIN_UP) for k in up), "model.unet.up_block_types",
           f"{up!r}: one per level, each {UNET_CROSS_UP} or {UNET_PLAIN_UP}")
    for name in ("layers_per_block", "norm_num_groups", "transformer_layers_per_block", "mid_block_layers",
                 "motion_max_seq_length", "temporal_transformer_layers_per_block",
                 "temporal_transformer_layers_per_mid_block", "cross_attention_dim"):
        _check(isinstance(u[name], int) and u[name] > 0, f"model.unet.{name}", f"{u[name]!r} must be a positive int")
    for c in chans:
        _check(c % u.norm_num_groups == 0, "model.unet.norm_num_groups",
               f"{u.norm_num_groups} does not divide block_out_channels entry {c}; pick a divisor")
    for name in ("num_attention_heads", "motion_num_attention_heads"):
        for c, h in zip(chans, _per_level(u[name], n, name), strict=True):
            _check(h > 0 and c % h == 0, f"model.unet.{name}", f"{h} heads do not divide a level's {c} channels")
    encoder_transformers = u.layers_per_block * sum(k == UNET_CROSS_DOWN for k in down)
    _check(0 <= m.ttm_layers <= encoder_transformers, "model.ttm_layers",
           f"{m.ttm_layers} must be in [0, {encoder_transformers}]: the U-Net's encoder spatial transformers "
           f"(model.unet.layers_per_block x the {UNET_CROSS_DOWN} blocks; SD 1.5 has 6)")
    _check(u.cross_attention_dim == t.d_model, "model.unet.cross_attention_dim",
           f"{u.cross_attention_dim} but text_encoder.d_model={t.d_model}; the U-Net cross-attends to the encoder's "
           f"output, set model.unet.cross_attention_dim={t.d_model}")
    a, d = config.autoencoder, config.data
    frames = 1 + (d.num_frames - 1) // max(1, a.time_factor)
    _check(frames <= u.motion_max_seq_length, "model.unet.motion_max_seq_length",
           f"{u.motion_max_seq_length} but the clip has {frames} latent frames (data.num_frames={d.num_frames}); the "
           f"motion modules' frame embedding has that many rows (AnimateDiff: 32): use fewer frames")
    _check(all(isinstance(u[k], bool) for k in ("use_linear_projection", "use_motion_mid_block",
                                                 "ttm_self_across_frames", "ttm_qk_norm")),
           "model.unet.use_linear_projection",
           "use_linear_projection, use_motion_mid_block, ttm_self_across_frames and ttm_qk_norm must be True/False")


def grid_step(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(t, h, w): the latent cells the backbone's grid must be a multiple of: the DiT's patch; the U-Net's one
    halving per level but the last, `2^(levels-1)` in H and W."""
    m = config.model
    if m.get("backbone", "dit") == "unet" and "unet" in m:
        s = 2 ** (len(tuple(m.unet.block_out_channels)) - 1)
        return 1, s, s
    return tuple(int(p) for p in m.get("patch_size", (1, 1, 1)))


def _check_autoencoder(config: ml_collections.ConfigDict) -> None:
    """autoencoder section (ttm_jax/models/autoencoder.py, ttm_jax/models/wan_vae.py)."""
    a = config.autoencoder
    _check(a.name in AUTOENCODERS, "autoencoder.name", f"{a.name!r}; choose one of {AUTOENCODERS}")
    _check(a.get("dtype", "float32") in DTYPES, "autoencoder.dtype", f"{a.get('dtype')!r}; choose one of {DTYPES}")
    _check(isinstance(a.get("chunk_frames", 1), int) and a.get("chunk_frames", 1) >= 0, "autoencoder.chunk_frames",
           f"{a.get('chunk_frames')!r} must be an int >= 0 (0: the whole clip in one pass)")
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
    scale, shift = (a.get(k, d) for k, d in IDENTITY_LATENT_NORM.items())
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
    patch = grid_step(config)  # the DiT's patch; the U-Net's 2^(levels-1) cells
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
    rung = d.get("synthetic_rung", SYNTHETIC_FULL_RUNG)
    _check(rung in SYNTHETIC_RUNGS, "data.synthetic_rung",
           f"{rung!r}; choose one of {SYNTHETIC_RUNGS} (ladder rungs; {SYNTHETIC_FULL_RUNG}: the full set)")
    _check(isinstance(d.get("cached", False), bool), "data.cached", f"{d.get('cached')!r} must be True or False")
    _check(not d.get("cached", False) or bool(d.prepared_path), "data.cached",
           "True needs data.prepared_path: set it to the --out folder of `python -m ttm_jax.data.encode "
           "--prepared=... --out=...`, or set data.cached=False")


def _check_text_encoder(config: ml_collections.ConfigDict) -> None:
    """text_encoder section (ttm_jax/models/text_encoder.py, ttm_jax/models/tokenizer.py). A sentencepiece tokenizer
    without `tokenizer_path` passes: describe mode needs none, and `preflight` refuses it before training."""
    t = config.text_encoder
    _check(t.d_model > 0 and t.num_layers > 0, "text_encoder", "d_model and num_layers must be positive")
    _check(t.tokenizer in ("byte", "word", "sentencepiece", "clip"), "text_encoder.tokenizer",
           f"{t.tokenizer!r}; choose byte, word, sentencepiece or clip")
    _check((t.get("name") == "clip") == (t.tokenizer == "clip"), "text_encoder.tokenizer",
           f"{t.tokenizer!r} with text_encoder.name={t.get('name')!r}; the CLIP text encoder reads CLIP's BPE ids "
           f"and only it does: use name='clip' with tokenizer='clip' (ttm_jax/weights/clip_text.py)")
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
    _check(t.get("feed_forward", "gated-gelu") == "gated-gelu", "text_encoder.feed_forward",
           f"{t.get('feed_forward')!r}; only gated-gelu (T5 v1.1, ByT5, umT5) is implemented")
    _check(t.get("dtype", "float32") in DTYPES, "text_encoder.dtype", f"{t.get('dtype')!r}; choose one of {DTYPES}")
    _check(t.get("param_dtype", "float32") in DTYPES, "text_encoder.param_dtype",
           f"{t.get('param_dtype')!r}; choose one of {DTYPES}")


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
    cool = o.get("cooldown_steps", 0)
    room = config.train.total_steps - o.warmup_steps
    _check(type(cool) is int and (cool == 0 or 0 < cool <= room), "optim.cooldown_steps",
           f"{cool!r} must be 0 (off) or an int of at most train.total_steps - optim.warmup_steps = {room}; lower it"
           f" or raise train.total_steps")
    share = o.get("cooldown_fraction", 0.0)
    _check(isinstance(share, (int, float)) and 0.0 <= share <= 1.0, "optim.cooldown_fraction",
           f"{share!r} must be in [0, 1] (0: off; 0.5: the fall takes the run's second half)")
    _check(o.grad_clip_norm >= 0, "optim.grad_clip_norm", f"{o.grad_clip_norm} must be >= 0 (0: no clipping)")


def _check_objective(config: ml_collections.ConfigDict) -> None:
    """objective section (ttm_jax/assembly/objectives.py, ttm_jax/diffusion/flow.py, ttm_jax/diffusion/ddim.py)."""
    j = config.objective
    # objective.name is checked by the registry (`assembly/objectives.py: OBJECTIVES`), where new ones register
    if j.get("name") == "ddim_v":
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
    context = h.get("context", 1)
    _check(type(context) is int and context >= 1, "mesh.context",
           f"{context!r} must be an int >= 1 (1: the video tokens are not split)")
    if context == 1:
        return
    m = config.model
    backbone = m.get("backbone", "dit")
    _check(backbone == "dit", "mesh.context",
           f"{context} but model.backbone={backbone!r} has no context-parallel path (only the DiT shards its video "
           f"tokens, ttm_jax/models/context_parallel.py); set mesh.context=1")
    heads = m.get("num_heads")
    tensor = sizes.get("tensor", 1)
    if isinstance(heads, int) and tensor > 1 and heads % tensor == 0:
        heads //= tensor  # heads per tensor shard, what Ulysses splits
    _check(m.get("context_impl", "ulysses") != "ulysses" or not isinstance(heads, int) or heads % context == 0,
           "mesh.context",
           f"{context} does not divide the {heads} heads (model.num_heads per mesh.shape.tensor shard) that "
           f"model.context_impl='ulysses' splits; choose a mesh.context dividing {heads}, or model.context_impl='ring'")
    t, hh, ww, _ = latent_shape(config)
    pt, ph, pw = (int(p) for p in m.get("patch_size", (1, 1, 1)))
    if not (t % pt or hh % ph or ww % pw):  # else the model check names the patch size
        tokens = (t // pt) * (hh // ph) * (ww // pw)
        _check(tokens % context == 0, "mesh.context",
               f"{context} does not divide the {tokens} video tokens (latent {(t, hh, ww)} in patches "
               f"{(pt, ph, pw)}) the DiT splits over it; choose a mesh.context dividing {tokens}, or data.num_frames "
               f"/ height / width whose token count it divides")


# In the order `validate` runs them: a config with several bad values reports the first of this order.
_CHECKERS: tuple[Callable[[ml_collections.ConfigDict], None], ...] = (
    _check_model, _check_autoencoder, _check_data, _check_text_encoder, _check_sample, _check_train, _check_optim,
    _check_objective, _check_mesh,
)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every value that could otherwise fail after compute has been spent; returns the config."""
    _check(config.stage in STAGES, "stage", f"{config.stage!r} is not one of {sorted(STAGES)} "
           f"({'; '.join(f'{k}: {v[0]}' for k, v in STAGES.items())})")
    for check in _CHECKERS:
        check(config)
    return config
