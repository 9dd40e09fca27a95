"""The Wan 2.1 causal 3D VAE in Flax (channels-last), numerically equal to diffusers' `AutoencoderKLWan`.

Layout (Wan 2.1, `is_residual=False`): an encoder of causal Conv3d / residual blocks (channel RMS norm, SiLU) with
`downsample2d` / `downsample3d` resamplers, a mid block (residual, single-head spatial attention, residual), and a
`2 * z_dim` head whose first half is the posterior mean; a 1x1 `quant_conv`; the mirror decoder behind a 1x1
`post_quant_conv`, with `upsample2d` / `upsample3d` resamplers and a final clamp to [-1, 1].

Time is causal. Every 3x3x3 conv sees two frames of left context (zeros before the clip); the time resamplers treat
frame 0 on its own: `downsample3d` passes frame 0 through and applies its stride-2 time conv to windows starting at
frames 0, 2, 4, ...; `upsample3d` passes frame 0 through and turns every later frame into two. So `T = 1 + 4k`
frames <-> `1 + k` latent frames (for Wan's `temperal_downsample=(False, True, True)`).

Chunking: `encode` / `decode` process the time axis in chunks (frame 0 first, then `chunk` latent frames at a time)
carrying each layer's causal context in Flax's `cache` collection through a `lax.scan`, as diffusers does with its
`feat_cache`; only one chunk's activations are alive at a time, so long clips fit. `chunk=0` runs the whole clip in
one pass; both give the same result (tests/test_wan_vae.py).

Latents: `WanAutoencoder` (a `models/autoencoder.FlaxVAE`) `encode` returns what the DiT sees, the posterior mean
normalised by the checkpoint's `latents_mean` / `latents_std` (`(mu - mean) / std`, as diffusers' Wan pipelines);
`decode` undoes it. The raw functions `encode` / `decode` in this file work on un-normalised latents, like
`AutoencoderKLWan`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttm_jax.models import autoencoder, norms

CONTEXT = 2  # frames of causal context of a time-kernel-3 conv (diffusers' CACHE_T)


# ----------------------------------------------------------------------------------------------------------------
# Architecture description


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """The architecture fields of diffusers' `AutoencoderKLWan` config.json that Wan 2.1 uses."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    in_channels: int = 3
    out_channels: int = 3

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample[: len(self.dim_mult) - 1])

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = autoencoder.CONFIG_FILE) -> WanVAEConfig:
        """Reads an `AutoencoderKLWan` config dict; raises on the Wan 2.2 features this port does not implement."""
        if cfg.get("is_residual", False):
            raise ValueError(f"{source}: is_residual=true is the Wan 2.2 VAE; ttm_jax.backbones.wan.vae implements "
                             "Wan 2.1 (is_residual=false). Point config.autoencoder.path at a Wan 2.1 VAE folder")
        if cfg.get("patch_size") not in (None, 1):
            raise ValueError(f"{source}: patch_size={cfg['patch_size']} (Wan 2.2) is not supported; use a Wan 2.1 "
                             "VAE (patch_size null)")
        if cfg.get("attn_scales"):
            # diffusers' encoder calls its WanAttentionBlocks with feat_cache, which they do not take, so no
            # AutoencoderKLWan with attention in the down blocks can encode; Wan 2.1 has none
            raise ValueError(f"{source}: attn_scales={cfg['attn_scales']} is not supported (Wan 2.1 uses []); "
                             "diffusers' AutoencoderKLWan cannot encode with it either")
        dec = cfg.get("decoder_base_dim")
        if dec is not None and dec != cfg.get("base_dim", 96):
            raise ValueError(f"{source}: decoder_base_dim={dec} != base_dim={cfg.get('base_dim')} is not supported")
        n = len(cfg.get("dim_mult", cls.dim_mult))
        td = tuple(bool(t) for t in cfg.get("temperal_downsample", cls.temperal_downsample))
        if len(td) < n - 1:
            raise ValueError(f"{source}: temperal_downsample has {len(td)} entries, dim_mult needs {n - 1}")
        # the decoder reverses the list *before* indexing it per level: only n - 1 entries are consistent
        if len(td) != n - 1:
            raise ValueError(f"{source}: temperal_downsample={list(td)} must have len(dim_mult) - 1 = {n - 1} "
                             "entries (the decoder indexes the reversed list, so extra entries break symmetry)")
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        z = int(cfg.get("z_dim", 16))
        for name, v in (("latents_mean", mean), ("latents_std", std)):
            if v is not None and len(v) != z:
                raise ValueError(f"{source}: {name} has {len(v)} entries but z_dim={z}")
        return cls(base_dim=int(cfg.get("base_dim", 96)), z_dim=z, dim_mult=tuple(int(m) for m in cfg["dim_mult"])
                   if "dim_mult" in cfg else cls.dim_mult, num_res_blocks=int(cfg.get("num_res_blocks", 2)),
                   temperal_downsample=td,
                   latents_mean=None if mean is None else tuple(float(m) for m in mean),
                   latents_std=None if std is None else tuple(float(s) for s in std),
                   in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)))


def read_config(path: str) -> WanVAEConfig:
    """`WanVAEConfig` from a diffusers VAE folder (`<path>/config.json`)."""
    return WanAutoencoder.read_config(path)


# ----------------------------------------------------------------------------------------------------------------
# Layers


def _conv(module: nn.Module, x: jax.Array, features: int, kernel_size: tuple[int, ...],
          strides: tuple[int, ...] | None = None) -> jax.Array:
    """VALID convolution over the trailing `len(kernel_size)` spatial axes of `[..., *spatial, C]` (callers pad).

    Declares `module`'s parameters as diffusers' torch conv, transposed: `kernel [*kernel_size, C_in, C_out]`,
    `bias [C_out]`.
    """
    nd = len(kernel_size)
    kernel = module.param("kernel", nn.initializers.lecun_normal(), (*kernel_size, x.shape[-1], features),
                          module.param_dtype)
    bias = module.param("bias", nn.initializers.normal(0.02), (features,), module.param_dtype)
    lead = x.shape[: x.ndim - nd - 1]
    x = x.reshape((-1, *x.shape[x.ndim - nd - 1:]))
    spec = "DHW"[3 - nd:]
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spec}C", f"{spec}IO", f"N{spec}C"))
    y = jax.lax.conv_general_dilated(x.astype(module.dtype), kernel.astype(module.dtype), strides or (1,) * nd,
                                     "VALID", dimension_numbers=dn, precision=module.precision)
    y = y + bias.astype(module.dtype)
    return y.reshape((*lead, *y.shape[1:]))


class Conv(nn.Module):
    """A VALID conv with parameters `kernel [*kernel_size, C_in, C_out]`, `bias [C_out]` (see `_conv`)."""

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self, x, self.features, self.kernel_size, self.strides)


def _with_context(module: nn.Module, x: jax.Array, frames: int, first: bool, name: str = "context") -> jax.Array:
    """Prepends `frames` frames of causal context to `x [B, T, H, W, C]`.

    The context is zeros on the first chunk (`first=True`, which is also the one-pass mode), else the tail that the
    previous chunk left in the `cache` collection. When `cache` is mutable the new tail is stored for the next chunk.
    """
    b, _, h, w, c = x.shape
    if first:
        prev = jnp.zeros((b, frames, h, w, c), x.dtype)
    else:
        if not module.has_variable("cache", name):
            raise ValueError(f"wan_vae: {'/'.join(module.path)} has no cached context; run the first chunk with "
                             "first=True and mutable=['cache'] before later chunks")
        prev = module.get_variable("cache", name).astype(x.dtype)
    xp = jnp.concatenate([prev, x], axis=1)
    if module.is_mutable_collection("cache"):
        module.put_variable("cache", name, xp[:, -frames:])
    return xp


class CausalConv3d(nn.Module):
    """diffusers' `WanCausalConv3d`: `kt - 1` frames of causal (left) time context, symmetric zero space padding."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        kt, kh, kw = self.kernel_size
        if kt > 1:
            x = _with_context(self, x, kt - 1, first)
        if kh > 1 or kw > 1:
            x = jnp.pad(x, ((0, 0), (0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        return _conv(self, x, self.features, self.kernel_size)


class ResidualBlock(nn.Module):
    """`WanResidualBlock`: norm, SiLU, causal 3x3x3 conv, twice; 1x1x1 shortcut when the width changes."""

    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = x
        if x.shape[-1] != self.out_dim:
            h = CausalConv3d(self.out_dim, (1, 1, 1), name="conv_shortcut", **kw)(x)
        x = nn.silu(norms.L2Norm(self.dtype, self.param_dtype, name="norm1")(x))
        x = CausalConv3d(self.out_dim, name="conv1", **kw)(x, first)
        x = nn.silu(norms.L2Norm(self.dtype, self.param_dtype, name="norm2")(x))
        x = CausalConv3d(self.out_dim, name="conv2", **kw)(x, first)
        return x + h


class AttentionBlock(nn.Module):
    """`WanAttentionBlock`: single-head self-attention over the `H*W` positions of each frame."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        y = norms.L2Norm(self.dtype, self.param_dtype, name="norm")(x)
        qkv = Conv(3 * c, (1, 1), name="to_qkv", **kw)(y)
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 3 * c), 3, axis=-1)  # [B*T, HW, C] each
        # written out (not jax.nn.dot_product_attention) so `precision` reaches the two matmuls; logits and softmax
        # in float32; one head of width C, scale 1/sqrt(C)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * (c**-0.5), axis=-1).astype(v.dtype)
        y = jnp.einsum("bqk,bkc->bqc", probs, v, precision=self.precision).reshape(b, t, h, w, c)
        return Conv(c, (1, 1), name="proj", **kw)(y) + x


class Resample(nn.Module):
    """`WanResample` in one of `downsample2d`, `downsample3d`, `upsample2d`, `upsample3d`."""

    mode: str
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            # frame 0 passes through; every later frame becomes two (the halves of a 2C-channel causal conv whose
            # context starts with zeros *after* frame 0, as diffusers' "Rep" cache marker)
            x0, rest = (x[:, :1], x[:, 1:]) if first else (None, x)
            if rest.shape[1] > 0:
                rest = _with_context(self, rest, CONTEXT, first, "time_context")
                rest = Conv(2 * c, (3, 1, 1), name="time_conv", **kw)(rest)
                tr = rest.shape[1]
                rest = rest.reshape(b, tr, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * tr, h, w, c)
            elif self.is_mutable_collection("cache"):
                self.put_variable("cache", "time_context", jnp.zeros((b, CONTEXT, h, w, c), x.dtype))
            x = rest if x0 is None else jnp.concatenate([x0, rest], axis=1)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at scale 2
            x = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
            return Conv(self.out_dim, (3, 3), name="resample", **kw)(x)
        # downsample: zero pad right/bottom by one, 3x3 stride 2
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
        x = Conv(self.out_dim, (3, 3), (2, 2), name="resample", **kw)(x)
        if self.mode == "downsample3d":
            # windows of 3 frames at stride 2 starting at frame 0 (the previous chunk's last frame after chunk 0);
            # frame 0 of the clip also passes through unchanged
            tail = x[:, -1:]
            if first:
                x0, xs = x[:, :1], x
            else:
                if not self.has_variable("cache", "last_frame"):
                    raise ValueError(f"wan_vae: {'/'.join(self.path)} has no cached frame; run the first chunk "
                                     "with first=True and mutable=['cache'] before later chunks")
                x0, xs = None, jnp.concatenate([self.get_variable("cache", "last_frame").astype(x.dtype), x], 1)
            if self.is_mutable_collection("cache"):
                self.put_variable("cache", "last_frame", tail)
            conv = Conv(self.out_dim, (3, 1, 1), (2, 1, 1), name="time_conv", **kw)
            if xs.shape[1] >= 3:
                y = conv(xs)
                x = y if x0 is None else jnp.concatenate([x0, y], axis=1)
            else:
                if self.is_initializing():
                    conv(jnp.zeros((b, 3, *x.shape[2:]), x.dtype))
                x = x0
        return x


class MidBlock(nn.Module):
    """`WanMidBlock`: residual, attention, residual."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        c = x.shape[-1]
        x = ResidualBlock(c, name="resnets_0", **kw)(x, first)
        x = AttentionBlock(name="attentions_0", **kw)(x)
        return ResidualBlock(c, name="resnets_1", **kw)(x, first)


class Encoder(nn.Module):
    """`WanEncoder3d`: video `[B, T, H, W, C_in]` -> `[B, T', H', W', 2 z_dim]` (mean and log-variance)."""

    cfg: WanVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        x = CausalConv3d(dims[0], name="conv_in", **kw)(x.astype(self.dtype), first)
        n = 0  # diffusers' flat down_blocks index
        for i, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, name=f"down_blocks_{n}", **kw)(x, first)
                n += 1
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                x = Resample(mode, out_dim, name=f"down_blocks_{n}", **kw)(x, first)
                n += 1
        x = MidBlock(name="mid_block", **kw)(x, first)
        x = nn.silu(norms.L2Norm(self.dtype, self.param_dtype, name="norm_out")(x))
        return CausalConv3d(2 * cfg.z_dim, name="conv_out", **kw)(x, first)


class Decoder(nn.Module):
    """`WanDecoder3d`: latent `[B, T', H', W', z_dim]` -> video `[B, T, H, W, C_out]` (not clamped)."""

    cfg: WanVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, first: bool = True) -> jax.Array:
        cfg = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        mult = cfg.dim_mult
        dims = [cfg.base_dim * u for u in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        x = CausalConv3d(dims[0], name="conv_in", **kw)(x.astype(self.dtype), first)
        x = MidBlock(name="mid_block", **kw)(x, first)
        for i, out_dim in enumerate(dims[1:]):
            for j in range(cfg.num_res_blocks + 1):
                x = ResidualBlock(out_dim, name=f"up_blocks_{i}_resnets_{j}", **kw)(x, first)
            if i != len(mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
                x = Resample(mode, out_dim // 2, name=f"up_blocks_{i}_upsamplers_0", **kw)(x, first)
        x = nn.silu(norms.L2Norm(self.dtype, self.param_dtype, name="norm_out")(x))
        return CausalConv3d(cfg.out_channels, name="conv_out", **kw)(x, first)


class WanVAE(nn.Module):
    """The whole `AutoencoderKLWan` (Wan 2.1); methods run one time chunk (see `encode` / `decode` for clips)."""

    cfg: WanVAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        z = self.cfg.z_dim
        self.encoder = Encoder(self.cfg, **kw)
        self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(z, (1, 1, 1), **kw)
        self.decoder = Decoder(self.cfg, **kw)

    def encode_chunk(self, x: jax.Array, first: bool = True) -> jax.Array:
        """Video chunk `[B, t, H, W, 3]` -> posterior mean `[B, t', H/s, W/s, z_dim]` (not normalised)."""
        return autoencoder.posterior_mean(self.quant_conv(self.encoder(x, first)))

    def decode_chunk(self, z: jax.Array, first: bool = True) -> jax.Array:
        """Latent chunk `[B, t', h, w, z_dim]` (not normalised) -> video `[B, t, h*s, w*s, 3]` clamped to [-1, 1]."""
        return jnp.clip(self.decoder(self.post_quant_conv(z), first), -1.0, 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Encode and decode a whole clip in one pass (used for `init`)."""
        return self.decode_chunk(self.encode_chunk(x))


# ----------------------------------------------------------------------------------------------------------------
# Clip-level functions: chunking over time


def init_params(model: WanVAE, rng: jax.Array) -> dict[str, Any]:
    """Random parameters (for tests and benchmarks; real weights come from
    `ttm_jax.backbones.wan.vae_weights.load_params`)."""
    cfg = model.cfg
    s = cfg.space_factor
    video = jnp.zeros((1, 1 + 2 * cfg.time_factor, 2 * s, 2 * s, cfg.in_channels), jnp.float32)
    return model.init(rng, video)["params"]


def param_shapes(model: WanVAE) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating it."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def _run_chunks(model: WanVAE, params: Any, x: jax.Array, method: Any, in_per_chunk: int) -> jax.Array:
    """Frame 0 alone (fresh caches), then `lax.scan` over chunks of `in_per_chunk` frames carrying the caches."""
    out0, state = model.apply({"params": params}, x[:, :1], first=True, method=method, mutable=["cache"])
    rest = x[:, 1:]
    if rest.shape[1] == 0:
        return out0

    def step(cache: Any, xc: jax.Array) -> tuple[Any, jax.Array]:
        y, new = model.apply({"params": params, "cache": cache}, xc, first=False, method=method, mutable=["cache"])
        return new["cache"], y

    outs = [out0]
    n = rest.shape[1] // in_per_chunk
    cache = state["cache"]
    if n:
        body = rest[:, : n * in_per_chunk]
        body = body.reshape(body.shape[0], n, in_per_chunk, *body.shape[2:]).swapaxes(0, 1)
        cache, ys = jax.lax.scan(step, cache, body)
        ys = ys.swapaxes(0, 1)
        outs.append(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))
    if rest.shape[1] > n * in_per_chunk:  # a shorter last chunk
        outs.append(step(cache, rest[:, n * in_per_chunk:])[1])
    return jnp.concatenate(outs, axis=1)


def encode(model: WanVAE, params: Any, video: jax.Array, *, chunk: int = 1) -> jax.Array:
    """Video `[B, T, H, W, 3]` in [-1, 1] -> posterior mean `[B, 1 + (T-1)/tf, H/s, W/s, z_dim]`, not normalised.

    `chunk`: latent frames per chunk after frame 0 (diffusers: 1); 0 runs the clip in one pass. `T - 1` must be a
    multiple of the time factor `tf` (4 for Wan 2.1), H and W of the space factor `s` (8).
    """
    cfg = model.cfg
    _, t, h, w, c = video.shape
    tf, s = cfg.time_factor, cfg.space_factor
    if (t - 1) % tf or h % s or w % s or c != cfg.in_channels:
        raise ValueError(f"wan_vae.encode: video [B, T, H, W, C] = {video.shape} needs T = 1 + {tf}k (e.g. "
                         f"{1 + tf * max(1, (t - 1) // tf)}), H and W multiples of {s}, C = {cfg.in_channels}")
    if chunk <= 0:
        return model.apply({"params": params}, video, method=WanVAE.encode_chunk)
    return _run_chunks(model, params, video, WanVAE.encode_chunk, chunk * tf)


def decode(model: WanVAE, params: Any, latent: jax.Array, *, chunk: int = 1) -> jax.Array:
    """Latent `[B, T', h, w, z_dim]` (not normalised) -> video `[B, 1 + tf (T'-1), h s, w s, 3]` in [-1, 1]."""
    if latent.ndim != 5 or latent.shape[-1] != model.cfg.z_dim:
        raise ValueError(f"wan_vae.decode: latent must be [B, T', h, w, {model.cfg.z_dim}], got {latent.shape}")
    if chunk <= 0:
        return model.apply({"params": params}, latent, method=WanVAE.decode_chunk)
    return _run_chunks(model, params, latent, WanVAE.decode_chunk, chunk)


# ----------------------------------------------------------------------------------------------------------------
# The project's autoencoder interface


class WanAutoencoder(autoencoder.FlaxVAE, config_type=WanVAEConfig, module=WanVAE, init_params=init_params,
                     encode=encode, decode=decode, class_name="AutoencoderKLWan",
                     example_folder="<Wan2.1-T2V-1.3B-Diffusers>/vae"):
    """`make_autoencoder` object for `config.autoencoder.name == "wan"` (built, with the converted weights of a
    diffusers folder, by `ttm_jax.backbones.wan.vae_weights.make_wan_autoencoder`).

    `encode(video [B, T, H, W, 3] in [-1, 1]) -> [B, 1 + (T-1)/4, H/8, W/8, 16]` normalised latents (what the DiT
    sees); `decode(latent) -> video [B, 1 + 4 (T'-1), 8h, 8w, 3]` in [-1, 1]; chunked over time, `chunk` latent
    frames per step. The rest is `FlaxVAE`'s.
    """

    def latent_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """`(latents_mean, latents_std)` `[z_dim]` float32 (0 and 1 where config.json has none), passed to the
        jitted functions as arguments."""
        z, cfg = self.cfg.z_dim, self.cfg
        return (np.asarray(cfg.latents_mean if cfg.latents_mean is not None else [0.0] * z, np.float32),
                np.asarray(cfg.latents_std if cfg.latents_std is not None else [1.0] * z, np.float32))

    def normalise(self, mu: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
        """`(mu - latents_mean) / latents_std`, per channel."""
        return (mu - mean) / std

    def denormalise(self, z: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
        return z * std + mean
