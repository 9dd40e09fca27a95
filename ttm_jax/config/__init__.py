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
(`_RUNLOCAL`; its timings: docs/benchmarks.md). The batch of 2 fits one or two devices; on more, set
`--config.train.batch_size`.

`validate(config)` checks every value and raises `ConfigError` naming the field and the fix; `main` calls it before
any compute is spent.

The package, lowest first: `stages.py` (`StageKind`: what each `config.stage` is), `schema.py` (the sections'
builders, the named choices, `ConfigError`, `parse_arg`), `geometry.py` (`latent_shape`, `in_channels`, `grid_step`),
`variants.py` (`_VARIANT_TABLE`, `_STAGE_ROWS`, `runlocal`, `build`), `checks.py` (`validate`, one check per section),
`upgrade.py` (`upgrade(saved)`: a config saved by an older version, completed with the values that reproduce its run;
applied by `runtime/checkpoint.py`, the one reader of saved configs). Import this package (`from ttm_jax import
config as config_lib`); its modules import each other, never it.
"""

import ml_collections  # noqa: F401 - `config_lib.ml_collections.ConfigDict` in annotations

from ttm_jax.config.checks import validate
from ttm_jax.config.geometry import frame_place_channels, grid_step, in_channels, latent_shape, self_condition
from ttm_jax.config.schema import (
    ATTENTION_IMPLS,
    AUTOENCODERS,
    CONDITION_FRAMES,
    CROSS_IDS_FROM,
    DTYPES,
    IDENTITY_LATENT_NORM,
    REMAT_POLICIES,
    STAGE1_LATER_IDS,
    STAGE_ARGS,
    SYNTHETIC_FULL_RUNG,
    SYNTHETIC_RUNGS,
    ConfigError,
    cooldown_steps,
    parse_arg,
)
from ttm_jax.config.stages import STAGES, StageKind
from ttm_jax.config.upgrade import UPGRADES, upgrade
from ttm_jax.config.variants import _STAGE_ROWS, _VARIANT_TABLE, VARIANTS, build, set_total_steps

__all__ = [
    "ATTENTION_IMPLS", "AUTOENCODERS", "CONDITION_FRAMES", "CROSS_IDS_FROM", "DTYPES", "IDENTITY_LATENT_NORM",
    "REMAT_POLICIES", "STAGE1_LATER_IDS", "STAGE_ARGS", "STAGES", "SYNTHETIC_FULL_RUNG", "SYNTHETIC_RUNGS",
    "UPGRADES", "VARIANTS",
    "_STAGE_ROWS", "_VARIANT_TABLE", "ConfigError", "StageKind", "build", "cooldown_steps", "frame_place_channels",
    "grid_step", "in_channels", "latent_shape", "parse_arg", "self_condition", "set_total_steps", "upgrade", "validate",
]
