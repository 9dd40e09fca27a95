"""Registries: the modules and rules a stage is assembled from, chosen by name in the config.

  BACKBONES       `config.model.backbone`          ("dit", "unet")    the trained model and its init inputs
  TEXT_ENCODERS   `config.text_encoder.name`       ("t5", "umt5", "clip")  the frozen text encoder and its weights
  AUTOENCODERS    `config.autoencoder.name`        ("space_to_depth", "wan", "sd")
  OBJECTIVES      `config.objective.name`          ("rectified_flow"), in `objectives.py`
  STAGE_KINDS     `config.stage`                   (1: image-to-motion, 2: motion-to-video), in `inputs.py`

Adding a backbone is one `BACKBONES.register(name, Backbone(...))` (the AnimateDiff U-Net, "unet", with the `ddim_v`
objective, was added so); nothing in `train/` or `inference/` changes. Tokenizers are chosen by name too
(`config.text_encoder.tokenizer`), in `models/tokenizer.py`'s table, because the data pipeline (below this layer)
tokenizes the prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

import flax.linen as nn
import jax
import ml_collections

from ttm_jax import config as config_lib
from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.backbones.animatediff import text_weights as clip_text_weights
from ttm_jax.backbones.animatediff import vae_weights as sd_vae_weights
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import vae_weights as wan_vae_weights
from ttm_jax.models import autoencoder as autoencoder_lib
from ttm_jax.models import masks
from ttm_jax.models import text_encoder as text_encoder_lib
from ttm_jax.weights import t5 as t5_weights

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, for the config field `field`; an unknown name is an error naming the field and the choices.
    Names are strings (stage kinds: the `config.stage` numbers)."""

    def __init__(self, field: str):
        self.field = field
        self._entries: dict[Hashable, T] = {}

    def register(self, name: Hashable, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"registry {self.field}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: Hashable) -> T:
        """Remove an entry (tests that register their own)."""
        return self._entries.pop(name)

    def get(self, name: Hashable) -> T:
        if name not in self._entries:
            raise ValueError(f"config.{self.field}: {name!r} is not registered; choose one of "
                             f"{sorted(self._entries, key=str)}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._entries)


# ------------------------------------------------------------------------------------------------------- backbones


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A trained model family.

    build: `config -> nn.Module` with the call `(x, timestep, context, **kwargs) -> [B, T', H', W', C]`.
    init_inputs: `(config, *, batch, full, abstract) -> (args, kwargs)` for `init`/`apply`: the smallest inputs that
      build every parameter (`full=False`), or inputs of the configured clip size (`full=True`, for FLOPs).
    object_ids: `(config, autoencoder, object_masks bool [B, T, H, W, K]) -> (token_ids, cross_token_ids)`, the
      per-token object ids of the added layers in the backbone's own token layout (None: no added layers).
    state_fields: config fields that fix the shapes of the backbone's parameters (a resume must keep them).
    """

    build: Callable[[ml_collections.ConfigDict], nn.Module]
    init_inputs: Callable[..., tuple[tuple, dict[str, Any]]]
    object_ids: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    state_fields: tuple[str, ...] = ()


def backbone_name(config: ml_collections.ConfigDict) -> str:
    return config.model.backbone


def _dit_config(config: ml_collections.ConfigDict) -> dit_lib.DiTConfig:
    return dit_lib.DiTConfig.from_config(config.model)


def _build_dit(config: ml_collections.ConfigDict) -> nn.Module:
    return dit_lib.DiT(config.model, config_lib.in_channels(config), config.autoencoder.latent_channels)


def _dit_init_inputs(config: ml_collections.ConfigDict, *, batch: int = 1, full: bool = False,
                     abstract: bool = False) -> tuple[tuple, dict[str, Any]]:
    """The DiT's inputs: one patch (`full=False`; text at `max_length`, local prompts at `(K+1) * Lp`, as training
    feeds them) or the configured latent grid (`full=True`)."""
    t = config.text_encoder
    grid = config_lib.latent_shape(config)[:3] if full else None
    local_len = (int(config.data.max_objects) + 1) * int(t.local_max_length)
    return dit_lib.init_inputs(_dit_config(config), config_lib.in_channels(config), batch=batch, grid=grid,
                               text_len=int(t.max_length), local_len=local_len, abstract=abstract)


def _dit_object_ids(config: ml_collections.ConfigDict, ae: Any, object_masks: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Per-token ids in the DiT's `(t, h, w)` patch order: by area majority for masked self-attention, by box or mask
    (`config.model.cross_ids_from`) for masked cross-attention (`ttm_jax/models/masks.py`)."""
    geometry = dict(time_factor=ae.time_factor, space_factor=ae.space_factor,
                    patch_size=tuple(config.model.patch_size))
    by = masks.token_ids_from_boxes if config.model.cross_ids_from == "bbox" else masks.token_ids_from_masks
    return masks.token_ids_from_masks(object_masks, **geometry), by(object_masks, **geometry)


BACKBONES: Registry[Backbone] = Registry("model.backbone")
BACKBONES.register("dit", Backbone(
    build=_build_dit, init_inputs=_dit_init_inputs, object_ids=_dit_object_ids,
    state_fields=tuple(f"model.{k}" for k in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim",
                                              "ttm_layers", "patch_size", "qk_norm", "cross_attn_norm",
                                              "scan_layers", "param_dtype"))))



# `config.model` fields the U-Net shares with the DiT; its own are in `config.model.unet` (config.py: `_unet`)
UNET_SHARED_FIELDS = ("ttm_layers", "ttm_masked", "ttm_masked_self", "ttm_masked_cross", "attention",
                      "attention_sparse", "remat_policy", "dtype", "param_dtype")


def unet_config(config: ml_collections.ConfigDict) -> unet_lib.UNetConfig:
    """The `UNetConfig` of a `backbone="unet"` config: `config.model.unet` (the architecture) with the shared
    `config.model` fields (`UNET_SHARED_FIELDS`) on top."""
    m = config.model
    if "unet" not in m:
        raise ValueError("config.model.unet: missing; a backbone='unet' config needs the U-Net section (e.g. "
                         "configs/stage2.py:tiny_unet)")
    fields = {k: v for k, v in m.unet.items() if not k.startswith("pretrained_")}
    fields.update({k: m[k] for k in UNET_SHARED_FIELDS if k in m})
    return unet_lib.UNetConfig.from_config(fields)


def _build_unet(config: ml_collections.ConfigDict) -> nn.Module:
    return unet_lib.UNet(unet_config(config), config_lib.in_channels(config), config.autoencoder.latent_channels)


def _unet_init_inputs(config: ml_collections.ConfigDict, *, batch: int = 1, full: bool = False,
                      abstract: bool = False) -> tuple[tuple, dict[str, Any]]:
    """The U-Net's inputs: one frame of `2^(levels-1)` cells (`full=False`), or the configured latent grid; text at
    `max_length`, local prompts at `(K+1) * Lp`."""
    t = config.text_encoder
    grid = config_lib.latent_shape(config)[:3] if full else None
    local_len = (int(config.data.max_objects) + 1) * int(t.local_max_length)
    return unet_lib.init_inputs(unet_config(config), config_lib.in_channels(config), batch=batch, grid=grid,
                                text_len=int(t.max_length), local_len=local_len, abstract=abstract)


def _unet_object_ids(config: ml_collections.ConfigDict, ae: Any, object_masks: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """Per-cell ids in the U-Net's layout: every TTM level's latent grid `(t, h, w)` row-major, concatenated
    (`unet.object_ids`); cross ids by box or mask (`config.model.cross_ids_from`)."""
    return unet_lib.object_ids(unet_config(config), object_masks, time_factor=ae.time_factor,
                               space_factor=ae.space_factor, cross_from_boxes=config.model.cross_ids_from == "bbox")


BACKBONES.register("unet", Backbone(
    build=_build_unet, init_inputs=_unet_init_inputs, object_ids=_unet_object_ids,
    state_fields=("model.ttm_layers", "model.param_dtype")
    + tuple(f"model.unet.{k}" for k in config_lib.UNET_STATE_KEYS)))


def build_backbone(config: ml_collections.ConfigDict) -> nn.Module:
    return BACKBONES.get(backbone_name(config)).build(config)


def init_inputs(config: ml_collections.ConfigDict, **kw: Any) -> tuple[tuple, dict[str, Any]]:
    """The configured backbone's `(args, kwargs)` (`Backbone.init_inputs`)."""
    return BACKBONES.get(backbone_name(config)).init_inputs(config, **kw)


def object_ids(config: ml_collections.ConfigDict, ae: Any, object_masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The configured backbone's per-token object ids (`Backbone.object_ids`)."""
    fn = BACKBONES.get(backbone_name(config)).object_ids
    if fn is None:
        raise ValueError(f"config.model.backbone: {backbone_name(config)!r} has no added layers (no object_ids); set "
                         f"config.model.ttm_layers=0")
    return fn(config, ae, object_masks)


def state_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Config fields that fix the shapes of the trained state: the backbone's plus the run's own."""
    own = ("stage", "model.backbone", "autoencoder.latent_channels", "text_encoder.d_model", "optim.ema_decay",
           "model.self_condition", "model.condition_frames")  # the last two: the input channels
    return own + BACKBONES.get(backbone_name(config)).state_fields


# --------------------------------------------------------------------------------------------------- text encoders


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A frozen text encoder: `build(config.text_encoder) -> nn.Module` `(ids [B, L], mask [B, L]) -> [B, L, d]`;
    `is_source_folder(path)` (a folder in the source framework's layout, e.g. transformers', converted on the fly)
    / `load(config.text_encoder, path) -> params`; any other path is read as an Orbax checkpoint of converted
    params. `zero_padding`: the stage zeroes the outputs at padding positions (`inputs.encode_text`), as Wan feeds
    umT5's; False keeps them, as SD 1.5 / AnimateDiff feed CLIP's (their U-Net was trained on those values)."""

    build: Callable[[ml_collections.ConfigDict], nn.Module]
    is_source_folder: Callable[[str], bool]
    load: Callable[[ml_collections.ConfigDict, str], Any]
    zero_padding: bool = True


TEXT_ENCODERS: Registry[TextEncoder] = Registry("text_encoder.name")
_T5 = TextEncoder(build=text_encoder_lib.T5Encoder, is_source_folder=t5_weights.is_transformers_checkpoint,
                  load=t5_weights.load_params)
TEXT_ENCODERS.register("t5", _T5)  # T5 v1.1 / ByT5 layout
TEXT_ENCODERS.register("umt5", _T5)  # umT5 (Wan 2.1): per-layer relative position bias, same code
# CLIP ViT-L/14 text tower (SD 1.5 / AnimateDiff): last_hidden_state; tokenizer="clip"
TEXT_ENCODERS.register("clip", TextEncoder(build=clip_text_weights.build,
                                           is_source_folder=clip_text_weights.is_source_folder,
                                           load=clip_text_weights.load, zero_padding=False))


def text_encoder(config: ml_collections.ConfigDict) -> TextEncoder:
    return TEXT_ENCODERS.get(config.text_encoder.name)


# ---------------------------------------------------------------------------------------------------- autoencoders

AUTOENCODERS: Registry[Callable[[ml_collections.ConfigDict], Any]] = Registry("autoencoder.name")
AUTOENCODERS.register("space_to_depth", autoencoder_lib.make_space_to_depth)
AUTOENCODERS.register("wan", wan_vae_weights.make_wan_autoencoder)  # weights from config.autoencoder.path
AUTOENCODERS.register("sd", sd_vae_weights.make_sd_autoencoder)  # SD 1.5 / AnimateDiff, per frame; same path field


def make_autoencoder(autoencoder_config: ml_collections.ConfigDict) -> Any:
    """The frozen autoencoder `config.autoencoder.name` names (pass `config.autoencoder`), its weights loaded from
    `config.autoencoder.path` where it has any (`models/autoencoder.py`'s interface)."""
    return AUTOENCODERS.get(autoencoder_config.name)(autoencoder_config)
