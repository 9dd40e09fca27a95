"""The variants: `_VARIANT_TABLE` (variant -> section -> the values that differ between variants), the stages' own
rows `_STAGE_ROWS`, `runlocal`, and `build(stage, arg)`, which puts a config together from them and the section
builders (`schema.py`) and the stage's kind (`stages.py`).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ttm_jax.backbones.animatediff.config import UNET_CROSS_DOWN, UNET_CROSS_UP, UNET_PLAIN_DOWN, UNET_PLAIN_UP
from ttm_jax.backbones.animatediff.config import section as _unet
from ttm_jax.config.geometry import grid_step
from ttm_jax.config.schema import (
    _SECTIONS,
    IDENTITY_LATENT_NORM,
    ConfigError,
    parse_arg,
)
from ttm_jax.config.stages import STAGES


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
        # 1,000 videos, generated and prepared once per workdir parent
        "data": {"num_frames": 9, "height": 32, "width": 32, "fps": 6.0, "synthetic_rung": 3,
                 "synthetic_num_videos": 1000},
        # the README's first command: a run that learns something on a CPU
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
_RUNLOCAL: dict[str, dict[str, Any]] = {
    "data": {"synthetic_num_videos": 8},
    "train": {"batch_size": 2, "total_steps": 8, "checkpoint_every_steps": 4, "log_every_steps": 1,
              "sample_every_steps": 8, "compiler_options": {"xla_backend_optimization_level": 0}},
    "optim": {"warmup_steps": 2},
    "sample": {"num_steps": 2},
}
_RUNLOCAL_SIDE = 32  # pixels: the largest height and width of a runlocal clip


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
    kind = STAGES.get(stage)  # an unknown stage builds, and `validate` names it
    if kind is not None:  # the stage's own model values (`StageKind.model_defaults`), a stage row's win
        c.model.update({k: over.get("model", {}).get(k, v) for k, v in kind.model_defaults.items()})
    if args["runlocal"]:
        _runlocal(c)
    return c


def set_total_steps(config: ml_collections.ConfigDict, steps: int) -> None:
    """Sets `train.total_steps` and keeps the variant's fall of the learning rate inside the new run: at most half of
    it, and after the warm-up (`optim.cooldown_steps` 0 stays 0; a `cooldown_fraction` keeps its share by itself)."""
    o = config.optim
    o.cooldown_steps = min(int(o.cooldown_steps), steps // 2, max(0, steps - int(o.warmup_steps)))
    config.train.total_steps = steps

