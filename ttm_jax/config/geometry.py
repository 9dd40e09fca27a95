"""What a config implies about shapes: the latent of a clip, the backbone's input channels and latent grid step."""

from __future__ import annotations

import ml_collections

from ttm_jax.config.families import family_config
from ttm_jax.config.stages import STAGES


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(T', H', W', C) of one clip's latent under the config's autoencoder (causal time compression)."""
    a, d = config.autoencoder, config.data
    t = 1 + (d.num_frames - 1) // a.time_factor
    return t, d.height // a.space_factor, d.width // a.space_factor, a.latent_channels


def in_channels(config: ml_collections.ConfigDict) -> int:
    """Channels into the DiT: the noisy latent plus the stage's conditions (`STAGES`: two for stages 1 and 2, one for
    TI2V) and the self-conditioning estimate of `model.self_condition`, each `latent_channels` wide, plus the
    frame-place channel of `model.condition_frames=indexed`."""
    extra = frame_place_channels(config.model.condition_frames)
    latents = 1 + STAGES[int(config.stage)].conditions + int(self_condition(config))
    return latents * config.autoencoder.latent_channels + extra


def self_condition(config: ml_collections.ConfigDict) -> bool:
    """`config.model.self_condition` (False for configs saved before the field existed: `upgrade`)."""
    return bool(config.model.self_condition)


def frame_place_channels(condition_frames: str) -> int:
    """Channels the stage input adds beyond the latents for `model.condition_frames` (`indexed`: the frame's place,
    `conditioning.stage_input`)."""
    return 1 if condition_frames == "indexed" else 0


def grid_step(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(t, h, w): the latent cells the backbone's grid must be a multiple of, its family's `grid_step` (the DiT's
    patch; the U-Net's one halving per level but the last, `2^(levels-1)` in H and W). A backbone outside the
    families: `model.patch_size` where the model section has one, else 1."""
    family = family_config(config)
    if family is not None:
        return family.grid_step(config)
    return tuple(int(p) for p in config.model.get("patch_size", (1, 1, 1)))
