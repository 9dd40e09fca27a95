"""Frozen video autoencoders behind one interface: `Autoencoder` (the protocol), `SpaceToDepth` (the exact,
parameter-free one) and `FlaxVAE` (the base of the VAEs with weights: SD's and Wan 2.1's).

An autoencoder maps a pixel video `[B, T, H, W, 3]` (float in [-1, 1]) to a latent `[B, T', H', W', C]` with causal
time compression, as the Wan 2.1 VAE: `T = 1 + n * time_factor` frames give `T' = 1 + n` latent frames; latent frame 0
covers frame 0 alone, latent frame `i > 0` covers frames `1 + (i - 1) * tf .. i * tf`. Space shrinks by
`space_factor` on each side. `encode` and `decode` are pure functions of arrays, so they can be called inside `jit`.

The latent the backbone sees is the encoder's output normalised to about unit variance, in one of diffusers' two
conventions: `scale_latent` (`scaling_factor` / `shift_factor`: SD's VAE, `SpaceToDepth`) or a VAE's own per-channel
`latents_mean` / `latents_std` (Wan's, `WanAutoencoder.normalise`).

`ttm_jax.assembly.registry.make_autoencoder(config.autoencoder)` builds the one the config names: `space_to_depth`
(`make_space_to_depth`, here), `wan` or `sd` (a `FlaxVAE` subclass in its backbone family's `vae.py`, its weights
from a diffusers folder at `config.autoencoder.path`: `FlaxVAE.load`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections

from ttm_jax import cli, storage
from ttm_jax.config import IDENTITY_LATENT_NORM

CONFIG_FILE = "config.json"  # a diffusers model folder's architecture


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


def scale_latent(x: jax.Array, shift: Any, scale: Any) -> jax.Array:
    """diffusers' `shift_factor` / `scaling_factor` normalisation: `(x - shift) * scale` (SD 1.5: 0 and 0.18215)."""
    return (x - shift) * scale


def unscale_latent(z: jax.Array, shift: Any, scale: Any) -> jax.Array:
    """The inverse of `scale_latent`: `z / scale + shift`."""
    return z / scale + shift


def posterior_mean(moments: jax.Array) -> jax.Array:
    """The mean half of a diagonal Gaussian posterior's moments `[..., 2C]` (mean, log-variance) -> `[..., C]`:
    what a frozen VAE's backbone is trained on (deterministic encoding, no sample drawn)."""
    return moments[..., : moments.shape[-1] // 2]


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
            x = scale_latent(x, self.shift_factor, self.scaling_factor).astype(x.dtype)
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
            latent = unscale_latent(latent, self.shift_factor, self.scaling_factor).astype(latent.dtype)
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


# ----------------------------------------------------------------------------------------------------------------
# The VAEs with weights


def read_diffusers_config(path: str, class_name: str, example: str) -> tuple[dict[str, Any], str]:
    """(the config dict, its file) of the diffusers model folder `path` (`<path>/config.json`), which must be a
    `class_name` folder; `example` names one (the errors' fix)."""
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: not found; config.autoencoder.path must be a diffusers {class_name} folder "
                                f"(config.json + diffusion_pytorch_model.safetensors), e.g. {example}")
    cfg = storage.read_json(file)
    if cfg.get("_class_name", class_name) != class_name:
        raise ValueError(f"{file}: _class_name={cfg['_class_name']!r}, expected {class_name}; set "
                         f"config.autoencoder.path to a diffusers {class_name} folder, e.g. {example}")
    return cfg, file


class FlaxVAE:
    """The base of the frozen VAEs with weights (SD's `AutoencoderKL`, `ttm_jax/backbones/animatediff/vae.py`; Wan
    2.1's `AutoencoderKLWan`, `ttm_jax/backbones/wan/vae.py`): the `Autoencoder` interface, written once over a
    family's Flax module and its clip-level functions.

    `encode(video [B, T, H, W, 3] in [-1, 1])` -> the posterior mean in float32, `normalise`d (what the backbone
    sees); `decode(latent)` -> `denormalise`, the decoder, float32 clamped to [-1, 1]. Both jitted once; `chunk` is
    the family's unit of work per step (SD: frames; Wan: latent frames after frame 0), so memory follows the chunk,
    not the clip. Inside another `jit` (a train step that encodes on the fly, `data/encode`) prefer
    `encode_with(params, video)` / `decode_with(params, latent)`: the weights are arguments there, not constants
    baked into the caller's program. Float32 compute runs the convolutions and matmuls at `Precision.HIGHEST`
    (float32 on TPU, no TF32 on GPU: what float32 is chosen for, diffusers parity); bfloat16 at the backend's
    default. `params=None` (`abstract`): the architecture alone, its `params` `jax.ShapeDtypeStruct`s (`describe`
    counts and lowers it, nothing allocated).

    A family's subclass names its parts in its class statement (`__init_subclass__`): `config_type` (its frozen
    architecture dataclass, with `from_diffusers(dict, source)`, `time_factor`, `space_factor`, `latent_channels`;
    the default instance is the released VAE's), `class_name` and `example_folder` (the diffusers class and a folder
    of it: `read_config` checks the one, errors name the other), `module` (the Flax module, built
    `module(cfg, dtype=, precision=)`), `init_params(model, rng)`, and the un-normalised clip-level
    `encode(model, params, video, *, chunk)` / `decode(model, params, latent, *, chunk)` (`chunk=0`: one pass; kept
    as `raw_encode` / `raw_decode`); and defines `normalise(mu, *stats)` / `denormalise(z, *stats)`, with
    `latent_stats()` the arrays they take as `jit` arguments (none where the constants can be baked in).
    """

    config_type: ClassVar[type]
    class_name: ClassVar[str]
    example_folder: ClassVar[str]
    module: ClassVar[Callable[..., Any]]
    init_params: ClassVar[Callable[[Any, jax.Array], Any]]
    raw_encode: ClassVar[Callable[..., jax.Array]]
    raw_decode: ClassVar[Callable[..., jax.Array]]

    def __init_subclass__(cls, *, config_type: type, class_name: str, example_folder: str, module: Any,
                          init_params: Callable[[Any, jax.Array], Any], encode: Callable[..., jax.Array],
                          decode: Callable[..., jax.Array], **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_type, cls.class_name, cls.example_folder = config_type, class_name, example_folder
        cls.module, cls.init_params = module, staticmethod(init_params)
        cls.raw_encode, cls.raw_decode = staticmethod(encode), staticmethod(decode)

    def __init__(self, cfg: Any, params: Any, *, dtype: Any = jnp.float32, chunk: int = 1,
                 precision: Any = None) -> None:
        self.cfg = cfg
        dtype = jnp.dtype(dtype) if dtype is not None else jnp.float32
        if precision is None and dtype == jnp.float32:
            precision = jax.lax.Precision.HIGHEST
        self.model = self.module(cfg, dtype=dtype, precision=precision)
        if params is None:
            self.params = jax.eval_shape(lambda: self.init_params(self.model, jax.random.key(0)))
        else:
            self.params = jax.tree.map(jnp.asarray, params)  # on device once, not per call
        self.chunk = int(chunk)
        self.time_factor = cfg.time_factor
        self.space_factor = cfg.space_factor
        self.latent_channels = cfg.latent_channels
        self._stats = self.latent_stats()
        self._encode = jax.jit(self._encode_normalised)
        self._decode = jax.jit(self._decode_normalised)

    def latent_stats(self) -> tuple[Any, ...]:
        """The arrays `normalise` / `denormalise` take (passed to the jitted functions as arguments)."""
        return ()

    def normalise(self, mu: jax.Array, *stats: Any) -> jax.Array:
        """Posterior mean (float32) -> the latent the backbone sees."""
        raise NotImplementedError

    def denormalise(self, z: jax.Array, *stats: Any) -> jax.Array:
        """The inverse of `normalise` (float32)."""
        raise NotImplementedError

    def _encode_normalised(self, params: Any, video: jax.Array, *stats: Any) -> jax.Array:
        mu = self.raw_encode(self.model, params, video, chunk=self.chunk).astype(jnp.float32)
        return self.normalise(mu, *stats)

    def _decode_normalised(self, params: Any, latent: jax.Array, *stats: Any) -> jax.Array:
        z = self.denormalise(latent.astype(jnp.float32), *stats)
        return jnp.clip(self.raw_decode(self.model, params, z, chunk=self.chunk).astype(jnp.float32), -1.0, 1.0)

    def encode(self, video: jax.Array) -> jax.Array:
        """`[B, T, H, W, 3]` float in [-1, 1] -> normalised latent mean `[B, T', H/s, W/s, latent_channels]`
        float32."""
        return self.encode_with(self.params, video)

    def decode(self, latent: jax.Array) -> jax.Array:
        """Normalised latent `[B, T', h, w, latent_channels]` -> video `[B, T, h*s, w*s, 3]` float32 in [-1, 1]."""
        return self.decode_with(self.params, latent)

    def encode_with(self, params: Any, video: jax.Array) -> jax.Array:
        """`encode` with explicit params (a pure function of its arguments)."""
        return self._encode(params, video, *self._stats)

    def decode_with(self, params: Any, latent: jax.Array) -> jax.Array:
        """`decode` with explicit params (a pure function of its arguments)."""
        return self._decode(params, latent, *self._stats)

    @classmethod
    def read_config(cls, path: str) -> Any:
        """The `config_type` of the diffusers folder `path` (`<path>/config.json`, a `class_name` folder)."""
        cfg, file = read_diffusers_config(path, cls.class_name, cls.example_folder)
        return cls.config_type.from_diffusers(cfg, source=file)

    @classmethod
    def abstract(cls, config: ml_collections.ConfigDict) -> FlaxVAE:
        """`config.autoencoder`'s architecture without weights: from the folder `config.path`'s config.json when
        given, else the released VAE's (`config_type()`); `params` are shapes."""
        path = config.get("path", "")
        return cls(cls.read_config(path) if path else cls.config_type(), None)

    @classmethod
    def load(cls, config: ml_collections.ConfigDict,
             load_params: Callable[[str, Any], tuple[Any, Any]]) -> FlaxVAE:
        """The VAE of `config.autoencoder` (the `make_autoencoder` path) with the weights of the diffusers folder
        `config.path`, read by the family's `load_params(path, cfg) -> (cfg, params)`.

        Reads `path`, `dtype` (compute dtype, default float32) and `chunk_frames` (the chunk, default 1; 0: the clip
        in one pass), and checks `latent_channels`, `time_factor` and `space_factor` against the folder's
        config.json before any weight is read.
        """
        path = config.get("path", "")
        if not path:
            raise cli.BadInput(f"config.autoencoder.path: empty, but autoencoder.name={config.name!r} needs weights; "
                               f"set it to a diffusers {cls.class_name} folder (config.json + "
                               f"diffusion_pytorch_model.safetensors), e.g. {cls.example_folder}")
        cfg = cls.read_config(path)
        for field in ("latent_channels", "time_factor", "space_factor"):
            want = getattr(cfg, field)
            have = config.get(field, want)
            if have != want:
                raise cli.BadInput(f"config.autoencoder.{field}: {have}, but {os.path.join(path, CONFIG_FILE)} makes "
                                   f"{want}; set config.autoencoder.{field}={want}")
        _, params = load_params(path, cfg)
        return cls(cfg, params, dtype=config.get("dtype", "float32"), chunk=config.get("chunk_frames", 1))
