"""Stable Diffusion's `AutoencoderKL` (SD 1.x / 2.x, AnimateDiff's frozen VAE) in Flax, channels-last, numerically equal
to diffusers' `AutoencoderKL`.

Layout (diffusers `autoencoders/vae.py`, `resnet.py`, `attention_processor.py`):
- encoder: 3x3 `conv_in`; per level i a `DownEncoderBlock2D` of `layers_per_block` residual blocks (GroupNorm, SiLU,
  3x3 conv, twice; 1x1 `conv_shortcut` when the width changes) and, except on the last level, a stride-2 3x3 conv after
  zero padding of one row / column at the bottom / right (diffusers' `Downsample2D(padding=0)`); a mid block (residual,
  single-head self-attention over the `H*W` positions with a GroupNorm in front, residual); GroupNorm, SiLU, 3x3
  `conv_out` to `2 * latent_channels` (posterior mean, log-variance);
- `quant_conv` / `post_quant_conv`: 1x1 convs (absent with `use_quant_conv=false` / `use_post_quant_conv=false`);
- decoder: 3x3 `conv_in`, the mid block, per level (widest first) `layers_per_block + 1` residual blocks and, except on
  the last level, nearest 2x upsampling followed by a 3x3 conv; GroupNorm, SiLU, 3x3 `conv_out`.
Every GroupNorm has eps 1e-6 and `norm_num_groups` groups; statistics are computed in float32 (two-pass variance).

The VAE is 2D: a video `[B, T, H, W, 3]` is encoded frame by frame (`time_factor` 1), in chunks of `chunk` images
(`lax.map`, so memory follows the chunk, not the clip). Encoding is deterministic: the posterior mean, as the
latents a frozen SD/AnimateDiff U-Net is trained on. `SDAutoencoder` (a `models/autoencoder.FlaxVAE`) `encode`
returns what the backbone sees, `scale_latent(mean, shift_factor, scaling_factor)` (SD 1.5: shift 0, scale
0.18215); `decode` undoes it and clamps to [-1, 1]. The clip-level `encode` / `decode` functions of this file work
on raw latents, like `AutoencoderKL.encode(...).latent_dist.mean` and `AutoencoderKL.decode(...).sample`
(unclamped).

Weights: `ttm_jax.backbones.animatediff.vae_weights` (a diffusers `AutoencoderKL` folder, converted on load).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttm_jax.models import autoencoder, norms

EPS = 1e-6  # every GroupNorm of diffusers' Encoder / Decoder


# ----------------------------------------------------------------------------------------------------------------
# Architecture description


@dataclasses.dataclass(frozen=True)
class SDVAEConfig:
    """The architecture fields of diffusers' `AutoencoderKL` config.json (defaults: SD 1.5's VAE)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    time_factor = 1  # a 2D VAE, applied per frame

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = autoencoder.CONFIG_FILE) -> SDVAEConfig:
        """Reads an `AutoencoderKL` config dict; raises, naming `source` and the field, on what this port does not
        implement."""
        channels = tuple(int(c) for c in cfg.get("block_out_channels", cls.block_out_channels))
        n = len(channels)
        for field, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = list(cfg.get(field, [want] * n))
            if kinds != [want] * n:
                raise ValueError(f"{source}: {field}={kinds} is not supported; ttm_jax.backbones.animatediff.vae "
                                 "implements "
                                 f"{n} x {want!r} (SD's AutoencoderKL)")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"{source}: act_fn={cfg['act_fn']!r} is not supported; SD's AutoencoderKL uses 'silu'")
        for name in ("latents_mean", "latents_std"):
            if cfg.get(name) is not None:
                raise ValueError(f"{source}: {name} is set; per-channel latent statistics are not supported "
                                 f"(SD 1.x / 2.x VAEs use scaling_factor alone); use such a VAE")
        groups = int(cfg.get("norm_num_groups", cls.norm_num_groups))
        if any(c % groups for c in channels):
            raise ValueError(f"{source}: block_out_channels={list(channels)} are not all multiples of "
                             f"norm_num_groups={groups}")
        shift = cfg.get("shift_factor")
        return cls(block_out_channels=channels, layers_per_block=int(cfg.get("layers_per_block", 1)),
                   latent_channels=int(cfg.get("latent_channels", 4)), norm_num_groups=groups,
                   in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
                   scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
                   shift_factor=0.0 if shift is None else float(shift),
                   use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                   use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                   mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)))


def read_config(path: str) -> SDVAEConfig:
    """`SDVAEConfig` from a diffusers `AutoencoderKL` folder (`<path>/config.json`)."""
    return SDAutoencoder.read_config(path)


# ----------------------------------------------------------------------------------------------------------------
# Layers (images `[N, H, W, C]`)


class Conv(nn.Module):
    """torch `nn.Conv2d` channels-last: `kernel [k, k, C_in, C_out]`, `bias [C_out]`, explicit `padding`
    ((top, bottom), (left, right))."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.normal(0.02), (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (self.strides,) * 2,
                                         self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=self.precision)
        return y + bias.astype(self.dtype)


class _Base(nn.Module):
    cfg: SDVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @property
    def kw(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

    def norm(self, name: str) -> norms.GroupNorm:
        return norms.GroupNorm(self.cfg.norm_num_groups, EPS, axis_name=None, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)


class ResnetBlock(_Base):
    """`ResnetBlock2D` without a time embedding: `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the skip through a
    1x1 `conv_shortcut` when the width changes."""

    out_channels: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv(self.out_channels, name="conv1", **self.kw)(nn.silu(self.norm("norm1")(x)))
        h = Conv(self.out_channels, name="conv2", **self.kw)(nn.silu(self.norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=((0, 0), (0, 0)), name="conv_shortcut", **self.kw)(x)
        return x + h


class Attention(_Base):
    """The mid block's `Attention` (one head of width C, scale 1/sqrt(C)) over the `H*W` positions of an image, with
    a GroupNorm in front and a residual: `to_q`, `to_k`, `to_v`, `to_out_0` are `[C, C]` Dense layers."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = self.norm("group_norm")(x).reshape(n, h * w, c)
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=self.param_dtype,
                                  precision=self.precision)
        q, k, v = (dense(name=f"to_{p}")(y) for p in "qkv")
        # written out so `precision` reaches both matmuls; logits and softmax in float32
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(v.dtype)
        y = jnp.einsum("bqk,bkc->bqc", probs, v, precision=self.precision)
        return dense(name="to_out_0")(y).reshape(n, h, w, c) + x


class MidBlock(_Base):
    """`UNetMidBlock2D`: residual, attention (unless `mid_block_add_attention=false`), residual."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(self.cfg, out_channels=c, name="resnets_0", **self.kw)(x)
        if self.cfg.mid_block_add_attention:
            x = Attention(self.cfg, name="attentions_0", **self.kw)(x)
        return ResnetBlock(self.cfg, out_channels=c, name="resnets_1", **self.kw)(x)


class Downsample(_Base):
    """diffusers' `Downsample2D(padding=0)`: zero padding of one row / column at the bottom / right, then a stride-2
    3x3 conv (`conv`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Conv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), name="conv", **self.kw)(x)


class Upsample(_Base):
    """diffusers' `Upsample2D(use_conv=True)`: nearest 2x, then a 3x3 conv (`conv`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv(x.shape[-1], name="conv", **self.kw)(x)


class Encoder(_Base):
    """Image `[N, H, W, in_channels]` -> `[N, H/s, W/s, 2 * latent_channels]` (mean, log-variance; before
    `quant_conv`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, self.kw
        x = Conv(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        last = len(cfg.block_out_channels) - 1
        for i, c in enumerate(cfg.block_out_channels):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(cfg, out_channels=c, name=f"down_blocks_{i}_resnets_{j}", **kw)(x)
            if i != last:
                x = Downsample(cfg, name=f"down_blocks_{i}_downsamplers_0", **kw)(x)
        x = MidBlock(cfg, name="mid_block", **kw)(x)
        x = nn.silu(self.norm("conv_norm_out")(x))
        return Conv(2 * cfg.latent_channels, name="conv_out", **kw)(x)


class Decoder(_Base):
    """Latent `[N, h, w, latent_channels]` (after `post_quant_conv`) -> image `[N, h*s, w*s, out_channels]`."""

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, self.kw
        x = Conv(cfg.block_out_channels[-1], name="conv_in", **kw)(z)
        x = MidBlock(cfg, name="mid_block", **kw)(x)
        widths = tuple(reversed(cfg.block_out_channels))
        for i, c in enumerate(widths):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(cfg, out_channels=c, name=f"up_blocks_{i}_resnets_{j}", **kw)(x)
            if i != len(widths) - 1:
                x = Upsample(cfg, name=f"up_blocks_{i}_upsamplers_0", **kw)(x)
        x = nn.silu(self.norm("conv_norm_out")(x))
        return Conv(cfg.out_channels, name="conv_out", **kw)(x)


class SDVAE(_Base):
    """The whole `AutoencoderKL`, on images; see `encode` / `decode` for videos."""

    def setup(self) -> None:
        kw, cfg = self.kw, self.cfg
        one = dict(kernel_size=1, padding=((0, 0), (0, 0)))
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = Conv(2 * cfg.latent_channels, **one, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = Conv(cfg.latent_channels, **one, **kw)

    def encode_images(self, x: jax.Array) -> jax.Array:
        """`[N, H, W, in_channels]` in [-1, 1] -> posterior mean `[N, H/s, W/s, latent_channels]` (not scaled)."""
        moments = self.encoder(x)
        if self.cfg.use_quant_conv:
            moments = self.quant_conv(moments)
        return autoencoder.posterior_mean(moments)

    def decode_images(self, z: jax.Array) -> jax.Array:
        """Latent `[N, h, w, latent_channels]` (not scaled) -> `[N, h*s, w*s, out_channels]`, not clamped."""
        if self.cfg.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encode and decode (used for `init`)."""
        return self.decode_images(self.encode_images(x))


def init_params(model: SDVAE, rng: jax.Array) -> dict[str, Any]:
    """Random parameters (for tests; real weights come from `ttm_jax.backbones.animatediff.vae_weights.load_params`)."""
    s = model.cfg.space_factor
    return model.init(rng, jnp.zeros((1, s, s, model.cfg.in_channels), jnp.float32))["params"]


def param_shapes(model: SDVAE) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating it."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


# ----------------------------------------------------------------------------------------------------------------
# Video-level functions: frame by frame, in chunks


def _per_image(fn: Any, x: jax.Array, chunk: int) -> jax.Array:
    """`fn([n, ...]) -> [n, ...]` over the `B*T` images of `x [B, T, ...]`, `chunk` images at a time (0: all)."""
    b, t = x.shape[:2]
    flat = x.reshape(b * t, *x.shape[2:])
    n = flat.shape[0]
    if chunk <= 0 or n <= chunk:
        y = fn(flat)
    else:
        k = n // chunk
        body = flat[: k * chunk].reshape(k, chunk, *flat.shape[1:])
        ys = jax.lax.map(fn, body)
        parts = [ys.reshape(k * chunk, *ys.shape[2:])]
        if n > k * chunk:
            parts.append(fn(flat[k * chunk:]))
        y = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return y.reshape(b, t, *y.shape[1:])


def encode(model: SDVAE, params: Any, video: jax.Array, *, chunk: int = 1) -> jax.Array:
    """Video `[B, T, H, W, 3]` in [-1, 1] -> posterior mean `[B, T, H/s, W/s, latent_channels]`, not scaled (as
    `AutoencoderKL.encode(frames).latent_dist.mean`); `chunk` frames per step (0: all at once)."""
    cfg = model.cfg
    s = cfg.space_factor
    if video.ndim != 5 or video.shape[2] % s or video.shape[3] % s or video.shape[-1] != cfg.in_channels:
        raise ValueError(f"sd_vae.encode: video must be [B, T, H, W, {cfg.in_channels}] with H and W multiples of "
                         f"{s}, got {video.shape}")
    fn = functools.partial(model.apply, {"params": params}, method=SDVAE.encode_images)
    return _per_image(fn, video, chunk)


def decode(model: SDVAE, params: Any, latent: jax.Array, *, chunk: int = 1) -> jax.Array:
    """Latent `[B, T, h, w, latent_channels]` (not scaled) -> video `[B, T, h*s, w*s, 3]`, not clamped (as
    `AutoencoderKL.decode(z).sample`)."""
    if latent.ndim != 5 or latent.shape[-1] != model.cfg.latent_channels:
        raise ValueError(f"sd_vae.decode: latent must be [B, T, h, w, {model.cfg.latent_channels}], got "
                         f"{latent.shape}")
    fn = functools.partial(model.apply, {"params": params}, method=SDVAE.decode_images)
    return _per_image(fn, latent, chunk)


# ----------------------------------------------------------------------------------------------------------------
# The project's autoencoder interface


class SDAutoencoder(autoencoder.FlaxVAE, config_type=SDVAEConfig, module=SDVAE, init_params=init_params,
                    encode=encode, decode=decode, class_name="AutoencoderKL",
                    example_folder="<stable-diffusion-v1-5>/vae"):
    """`make_autoencoder` object for `config.autoencoder.name == "sd"` (built, with the converted weights of a
    diffusers folder, by `ttm_jax.backbones.animatediff.vae_weights.make_sd_autoencoder`).

    `encode(video [B, T, H, W, 3] in [-1, 1]) -> [B, T, H/8, W/8, 4]`: the posterior mean of each frame,
    `(mean - shift_factor) * scaling_factor` (what an SD 1.5 / AnimateDiff U-Net sees); `decode(latent) -> video`
    clamped to [-1, 1]; `chunk` frames per step. The rest is `FlaxVAE`'s.
    """

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.cfg.shift_factor

    def normalise(self, mu: jax.Array) -> jax.Array:
        """`(mu - shift_factor) * scaling_factor`, the config's numbers baked into the program."""
        return autoencoder.scale_latent(mu, self.cfg.shift_factor, self.cfg.scaling_factor)

    def denormalise(self, z: jax.Array) -> jax.Array:
        return autoencoder.unscale_latent(z, self.cfg.shift_factor, self.cfg.scaling_factor)
