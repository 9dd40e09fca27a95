"""Frozen video autoencoders behind one interface, and `SpaceToDepth`, the exact parameter-free one.

An autoencoder maps a pixel video `[B, T, H, W, 3]` (float in [-1, 1]) to a latent `[B, T', H', W', C]` with causal
time compression, as the Wan 2.1 VAE: `T = 1 + n * time_factor` frames give `T' = 1 + n` latent frames; latent frame 0
covers frame 0 alone, latent frame `i > 0` covers frames `1 + (i - 1) * tf .. i * tf`. Space shrinks by
`space_factor` on each side. `encode` and `decode` are pure functions of arrays, so they can be called inside `jit`.

`ttm_jax.assembly.registry.make_autoencoder(config.autoencoder)` builds the one the config names: `space_to_depth`
(`make_space_to_depth`, here) or `wan` (`ttm_jax.backbones.wan.vae_weights.make_wan_autoencoder`: weights from a user
path).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections

from ttm_jax.config import IDENTITY_LATENT_NORM


@runtime_checkable
class Autoencoder(Protocol):
    """What the rest of the code may rely on; shapes are channels-last."""

    time_factor: int
    space_factor: int
    latent_channels: int

    def encode(self, video: jax.Array) -> jax.Array:
        """`[B, T, H, W, 3]` in [-1, 1], `T = 1 + n * time_factor` -> `[B, 1 + n, H/s, W/s, latent_channels]`."""
        ...

    def decode(self, latent: jax.Array) -> jax.Array:
        """`[B, T', H', W', latent_channels]` -> `[B, 1 + (T' - 1) * time_factor, H' * s, W' * s, 3]`."""
        ...


def latent_frames(num_frames: int, time_factor: int) -> int:
    """Latent frames of a `num_frames` clip under causal compression (`1 + (T - 1) / tf`); raises if `T` is not
    `1 + n * tf`."""
    if num_frames < 1 or (num_frames - 1) % time_factor:
        n = max(1, (num_frames - 1) // time_factor)
        raise ValueError(
            f"autoencoder: a clip of {num_frames} frames cannot be compressed causally with time_factor={time_factor}; "
            f"frames must be 1 + a multiple of {time_factor} (e.g. {1 + n * time_factor} or "
            f"{1 + (n + 1) * time_factor}); fix config.data.num_frames")
    return 1 + (num_frames - 1) // time_factor


@dataclasses.dataclass(frozen=True)
class SpaceToDepth:
    """Exact, parameter-free autoencoder: each latent token holds the raw pixels it covers.

    Latent channels are ordered `(dt, dy, dx, rgb)` with `dt` the frame slot inside the latent frame's `time_factor`
    slots, `dy, dx` the pixel inside the `space_factor x space_factor` patch. Frame 0 has no frames to group with, so
    it is repeated in all `time_factor` slots of latent frame 0 (every channel is a real pixel value, not padding);
    `decode` reads it back from slot 0. `decode(encode(x)) == x` bit for bit, any dtype, at the default
    `scaling_factor=1, shift_factor=0` (otherwise to rounding).
    """

    time_factor: int = 4
    space_factor: int = 4
    # latent = (pixels - shift_factor) * scaling_factor, as diffusers' VAEs normalise theirs (SD 1.5: scale 0.18215):
    # the noise schedule assumes latents of about unit variance. 1 and 0 (the default) keep the round trip exact.
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        for name in ("time_factor", "space_factor"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"autoencoder.{name}: {v!r} must be a positive int; fix config.autoencoder.{name}")
        if not self.scaling_factor > 0:
            raise ValueError(f"autoencoder.scaling_factor: {self.scaling_factor!r} must be > 0; fix "
                             f"config.autoencoder.scaling_factor")

    @property
    def _normalised(self) -> bool:
        return (self.scaling_factor, self.shift_factor) != tuple(IDENTITY_LATENT_NORM.values())

    @property
    def latent_channels(self) -> int:
        return 3 * self.space_factor**2 * self.time_factor

    def _check_video(self, video: jax.Array) -> None:
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"SpaceToDepth.encode: video must be [B, T, H, W, 3], got shape {tuple(video.shape)}")
        latent_frames(video.shape[1], self.time_factor)
        s = self.space_factor
        h, w = video.shape[2:4]
        if h % s or w % s:
            raise ValueError(
                f"SpaceToDepth.encode: frame size {h}x{w} is not divisible by space_factor={s}; use a height and "
                f"width that are multiples of {s} (config.data.height / config.data.width)")

    def encode(self, video: jax.Array) -> jax.Array:
        """`[B, 1 + n*tf, H, W, 3]` -> `[B, 1 + n, H/s, W/s, 3*s*s*tf]`; dtype kept."""
        video = jnp.asarray(video)
        self._check_video(video)
        tf, s = self.time_factor, self.space_factor
        b, t, h, w, c = video.shape
        first = jnp.repeat(video[:, :1], tf, axis=1)  # [B, tf, H, W, 3]: frame 0 in every slot
        frames = jnp.concatenate([first, video[:, 1:]], axis=1)  # [B, (1 + n) * tf, H, W, 3]
        lt = frames.shape[1] // tf
        x = frames.reshape(b, lt, tf, h // s, s, w // s, s, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, T', H', W', dt, dy, dx, rgb]
        x = x.reshape(b, lt, h // s, w // s, tf * s * s * c)
        if self._normalised:
            x = ((x - self.shift_factor) * self.scaling_factor).astype(x.dtype)
        return x

    def decode(self, latent: jax.Array) -> jax.Array:
        """`[B, T', H', W', 3*s*s*tf]` -> `[B, 1 + (T'-1)*tf, H'*s, W'*s, 3]`; dtype kept."""
        latent = jnp.asarray(latent)
        tf, s = self.time_factor, self.space_factor
        if latent.ndim != 5 or latent.shape[-1] != self.latent_channels:
            raise ValueError(
                f"SpaceToDepth.decode: latent must be [B, T', H', W', {self.latent_channels}] (3 * space_factor^2 * "
                f"time_factor), got shape {tuple(latent.shape)}")
        b, lt, hh, ww, _ = latent.shape
        if self._normalised:
            latent = (latent / self.scaling_factor + self.shift_factor).astype(latent.dtype)
        x = latent.reshape(b, lt, hh, ww, tf, s, s, 3)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, lt * tf, hh * s, ww * s, 3)
        # latent frame 0 holds frame 0 in every slot; slot 0 is the frame itself
        return jnp.concatenate([x[:, :1], x[:, tf:]], axis=1)


def make_space_to_depth(config: ml_collections.ConfigDict) -> SpaceToDepth:
    """`SpaceToDepth` from `config.autoencoder` (the `space_to_depth` entry of `ttm_jax.assembly.registry`), its
    `latent_channels` checked."""
    ae = SpaceToDepth(time_factor=int(config.time_factor), space_factor=int(config.space_factor),
                      **{k: float(config.get(k, d)) for k, d in IDENTITY_LATENT_NORM.items()})
    if int(config.latent_channels) != ae.latent_channels:
        raise ValueError(
            f"config.autoencoder.latent_channels: {config.latent_channels} but space_to_depth with space_factor="
            f"{ae.space_factor}, time_factor={ae.time_factor} makes {ae.latent_channels}; set it to "
            f"{ae.latent_channels}")
    return ae
