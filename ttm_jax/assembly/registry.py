"""Registries: the modules and rules a stage is assembled from, chosen by name in the config.

  BACKBONES       `config.model.backbone`          ("dit", "unet")    the trained model and its init inputs
  TEXT_ENCODERS   `config.text_encoder.name`       ("t5", "umt5", "clip")  the frozen text encoder and its weights
  AUTOENCODERS    `config.autoencoder.name`        ("space_to_depth", "wan", "sd")
  OBJECTIVES      `config.objective.name`          ("rectified_flow"), in `objectives.py`
  STAGE_KINDS     `config.stage`                   (1: image-to-motion, 2: motion-to-video), in `inputs.py`

Adding a backbone is one folder, `ttm_jax/backbones/<family>/` (its `entry.py` defines `BACKBONE`, an
`assembly/backbone.py: Backbone`), and its row in `ttm_jax/backbones/__init__.py: FAMILIES`, which `BACKBONES` is
filled from (the AnimateDiff U-Net, "unet", with the `ddim_v` objective, was added so); nothing here, in `train/`,
`inference/`, `convert/` or `describe` changes. Tokenizers are chosen by name too (`config.text_encoder.tokenizer`),
in `models/tokenizer.py`'s table, because the data pipeline (below this layer) tokenizes the prompts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

import flax.linen as nn
import jax
import ml_collections

from ttm_jax import backbones as backbone_families
from ttm_jax.assembly.backbone import Backbone
from ttm_jax.backbones.animatediff import text_weights as clip_text_weights
from ttm_jax.backbones.animatediff import vae as sd_vae
from ttm_jax.backbones.animatediff import vae_weights as sd_vae_weights
from ttm_jax.backbones.wan import vae as wan_vae
from ttm_jax.backbones.wan import vae_weights as wan_vae_weights
from ttm_jax.models import autoencoder as autoencoder_lib
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


DEFAULT_BACKBONE = "dit"  # `config.model.backbone`'s default, and the backbone of folders no entry claims

BACKBONES: Registry[Backbone] = Registry("model.backbone")
# every family of `ttm_jax.backbones.FAMILIES`, its `entry.py`'s BACKBONE under its name: "dit" (wan/), "unet"
# (animatediff/, with the `ddim_v` objective)
for _name, _entry in backbone_families.role_modules("entry").items():
    BACKBONES.register(_name, _entry.BACKBONE)


def backbone_name(config: ml_collections.ConfigDict) -> str:
    return config.model.backbone


def backbone(config: ml_collections.ConfigDict) -> Backbone:
    """The configured backbone's entry."""
    return BACKBONES.get(backbone_name(config))


def model_config(config: ml_collections.ConfigDict) -> Any:
    """The configured backbone's frozen model config (`Backbone.model_config`: a `DiTConfig`, a `UNetConfig`)."""
    return backbone(config).model_config(config)


def backbone_of(cfg: Any) -> str:
    """The `config.model.backbone` name of a frozen backbone config, by its type (`Backbone.config_type`)."""
    for name in BACKBONES:
        if BACKBONES.get(name).config_type is type(cfg):
            return str(name)
    raise ValueError(f"{type(cfg).__name__}: no registered backbone has this config type")


def folder_backbone(folder: str) -> str:
    """The backbone of an exported (or a source framework's) folder: the entry whose `is_folder` claims it, else
    `DEFAULT_BACKBONE`."""
    for name in BACKBONES:
        claims = BACKBONES.get(name).is_folder
        if claims is not None and claims(folder):
            return str(name)
    return DEFAULT_BACKBONE


def build_backbone(config: ml_collections.ConfigDict) -> nn.Module:
    return backbone(config).build(config)


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

@dataclasses.dataclass(frozen=True)
class AutoencoderEntry:
    """A frozen autoencoder: `make(config.autoencoder)` -> the `models/autoencoder.Autoencoder`, its weights loaded
    from `config.autoencoder.path` where it has any; `abstract(config.autoencoder)` -> its architecture as a
    `FlaxVAE` whose params are shapes (`describe`: parameter counts and encoder FLOPs, nothing loaded); None: it has
    no parameters (`space_to_depth`)."""

    make: Callable[[ml_collections.ConfigDict], Any]
    abstract: Callable[[ml_collections.ConfigDict], autoencoder_lib.FlaxVAE] | None = None


AUTOENCODERS: Registry[AutoencoderEntry] = Registry("autoencoder.name")
AUTOENCODERS.register("space_to_depth", AutoencoderEntry(autoencoder_lib.make_space_to_depth))
# weights from config.autoencoder.path: Wan 2.1's causal 3D VAE; SD 1.5 / AnimateDiff's, per frame
AUTOENCODERS.register("wan", AutoencoderEntry(wan_vae_weights.make_wan_autoencoder, wan_vae.WanAutoencoder.abstract))
AUTOENCODERS.register("sd", AutoencoderEntry(sd_vae_weights.make_sd_autoencoder, sd_vae.SDAutoencoder.abstract))


def make_autoencoder(autoencoder_config: ml_collections.ConfigDict) -> Any:
    """The frozen autoencoder `config.autoencoder.name` names (pass `config.autoencoder`), its weights loaded from
    `config.autoencoder.path` where it has any (`models/autoencoder.py`'s interface)."""
    return AUTOENCODERS.get(autoencoder_config.name).make(autoencoder_config)


def abstract_autoencoder(autoencoder_config: ml_collections.ConfigDict) -> autoencoder_lib.FlaxVAE | None:
    """The configured autoencoder's architecture with abstract params (`AutoencoderEntry.abstract`); None when it
    has no parameters."""
    abstract = AUTOENCODERS.get(autoencoder_config.name).abstract
    return None if abstract is None else abstract(autoencoder_config)
