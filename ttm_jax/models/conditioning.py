"""The DiT's input for each TTM stage: the noisy latent with its visual conditions, concatenated on channels.

  stage 1 (image-to-motion):  [noisy trajectory latent ; E(x0) ; E(s0)]
  stage 2 (motion-to-video):  [noisy video latent ; E(x0) ; E(trajectory), all frames]
  stage 0 (TI2V baseline):    [noisy video latent ; E(x0)]                                   (no trajectory)

The first-frame conditions (E(x0), and stage 1's E(s0)) fill the latent frames as `frames` says (config
`model.condition_frames`): `first`, latent frame 0 and zeros after (Wan 2.1's image-to-video), `all`, the same
latent in every frame (Stable Video Diffusion's concatenation), or `indexed`, as `all` plus one last channel holding
each latent frame's place in the clip, `t' / (T' - 1)` (0 in frame 0, 1 in the last; 0 when T' = 1).

Stage 1 needs the first frame's conditions in every frame: its frames 1+ have no other local condition, and with
`first` a small DiT must learn to fetch the first frame across frames through RoPE attention before it can place
anything (with `all` it places far more of each object on one training clip: `bench/stage1_probe.py`,
docs/benchmarks.md). With `all` every frame's conditions are the same and the DiT's RoPE positions are relative only,
so nothing in a token says which frame it is in; `indexed` says it. On the small stage-1 DiT it made no difference
(docs/results.md, the stage-1 study): the model learns the frames apart anyway; `all` stays stage 1's default.
Stages 2 and 0 keep `first`: their video frames have the trajectory (stage 2) or nothing (TI2V) and both carry the
image alike.

`x0` is the first frame, `s0` the first-frame segmentation painted as a trajectory frame; E is the autoencoder.
The noisy latent comes first, so a text-to-video backbone widened by `dit.expand_input_channels` (zero kernels for
the new channels) sees exactly its old input. For classifier-free guidance the "image" condition is dropped by
passing zeros for both condition latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttm_jax.config import CONDITION_FRAMES, frame_place_channels


def _first_frame_only(latent: jax.Array, frames: int) -> jax.Array:
    """`[B, 1 or T', H', W', C]` -> `[B, T', H', W', C]`: its frame 0 in frame 0, zeros in the others."""
    first = latent[:, :1]
    pad = jnp.zeros((latent.shape[0], frames - 1) + latent.shape[2:], latent.dtype)
    return jnp.concatenate([first, pad], axis=1)


def _first_frame_everywhere(latent: jax.Array, frames: int) -> jax.Array:
    """`[B, 1 or T', H', W', C]` -> `[B, T', H', W', C]`: its frame 0 in every frame."""
    return jnp.broadcast_to(latent[:, :1], (latent.shape[0], frames) + latent.shape[2:])


def stage_input(stage: int, noisy: jax.Array, first_frame_latent: jax.Array,
                cond_latent: jax.Array | None, *, frames: str = "first") -> jax.Array:
    """The channel-concatenated DiT input `[B, T', H', W', 3C]` (`2C` for stage 0; one more with `indexed`) of `stage`
    (module docstring).

    Args:
      stage: 1 (image-to-motion), 2 (motion-to-video) or 0 (the single-stage TI2V baseline).
      noisy: `[B, T', H', W', C]` the noisy trajectory (stage 1) or video (stage 2) latent.
      first_frame_latent: `[B, 1, H', W', C]` E(x0), the first frame encoded alone (or `[B, T', ...]`, of which only
        frame 0 is used, e.g. the latent of a whole clip: with a causal VAE its frame 0 depends on x0 only).
      cond_latent: stage 1: E(s0), `[B, 1 or T', H', W', C]` (frame 0 used); stage 2: E(trajectory) `[B, T', ...]`;
        stage 0: None.
      frames: `first`, `all` or `indexed`, how the first-frame conditions fill the latent frames (module docstring).
    """
    if stage not in (0, 1, 2):
        raise ValueError(f"conditioning.stage_input: stage={stage!r} must be 0, 1 or 2 (config.stage)")
    if (cond_latent is None) != (stage == 0):
        raise ValueError(f"conditioning.stage_input: stage {stage} takes "
                         f"{'no cond_latent' if stage == 0 else 'a cond_latent'}, got {cond_latent is not None}")
    if noisy.ndim != 5:
        raise ValueError(f"conditioning.stage_input: noisy must be [B, T', H', W', C], got {noisy.shape}")
    b, t, h, w, c = noisy.shape
    for name, lat in (("first_frame_latent", first_frame_latent), ("cond_latent", cond_latent)):
        if lat is None:
            continue
        if lat.ndim != 5 or lat.shape[0] != b or lat.shape[2:] != (h, w, c) or lat.shape[1] not in (1, t):
            raise ValueError(f"conditioning.stage_input: {name} must be [B={b}, 1 or {t}, {h}, {w}, {c}] like the "
                             f"noisy latent, got {lat.shape}")
    if frames not in CONDITION_FRAMES:
        raise ValueError(f"conditioning.stage_input: frames={frames!r}; choose one of {CONDITION_FRAMES} "
                         f"(config.model.condition_frames)")
    spread = _first_frame_only if frames == "first" else _first_frame_everywhere
    image = spread(first_frame_latent, t)
    dtype = noisy.dtype
    extra = []
    if frame_place_channels(frames):
        place = jnp.arange(t, dtype=jnp.float32) / max(t - 1, 1)
        extra = [jnp.broadcast_to(place[None, :, None, None, None], (b, t, h, w, 1)).astype(dtype)]
    if stage == 0:
        return jnp.concatenate([noisy, image.astype(dtype)] + extra, axis=-1)
    if stage == 1:
        cond = spread(cond_latent, t)
    else:
        if cond_latent.shape[1] != t:
            raise ValueError(f"conditioning.stage_input: stage 2 needs the whole trajectory latent [B, {t}, {h}, {w}, "
                             f"{c}] as cond_latent, got {cond_latent.shape}")
        cond = cond_latent
    return jnp.concatenate([noisy, image.astype(dtype), cond.astype(dtype)] + extra, axis=-1)
