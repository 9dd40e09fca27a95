"""The AnimateDiff U-Net's registry entry (`config.model.backbone = "unet"`; `assembly/registry.py` registers
`BACKBONE`)."""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from ttm_jax import config as config_lib
from ttm_jax.assembly.backbone import Backbone, stage_init_inputs
from ttm_jax.backbones.animatediff import config as unet_config
from ttm_jax.backbones.animatediff import export as unet_export
from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.backbones.animatediff import weights as unet_convert

# `config.model` fields the U-Net shares with the DiT; its own are in `config.model.unet` (`config.py`: `section`)
UNET_SHARED_FIELDS = ("ttm_layers", "ttm_masked", "ttm_masked_self", "ttm_masked_cross", "attention",
                      "attention_sparse", "remat_policy", "dtype", "param_dtype")


def model_config(config: ml_collections.ConfigDict) -> unet_lib.UNetConfig:
    """The `UNetConfig` of a `backbone="unet"` config: `config.model.unet` (the architecture) with the shared
    `config.model` fields (`UNET_SHARED_FIELDS`) on top."""
    m = config.model
    if "unet" not in m:
        raise ValueError("config.model.unet: missing; a backbone='unet' config needs the U-Net section (e.g. "
                         "configs/stage2.py:tiny_unet)")
    fields = {k: v for k, v in m.unet.items() if not k.startswith("pretrained_")}
    fields.update({k: m[k] for k in UNET_SHARED_FIELDS if k in m})
    return unet_lib.UNetConfig.from_config(fields)


def build(config: ml_collections.ConfigDict) -> nn.Module:
    return unet_lib.UNet(model_config(config), config_lib.in_channels(config), config.autoencoder.latent_channels)


# the smallest inputs: one frame of `2^(levels-1)` cells (`full=False`); or the configured latent grid
init_inputs = stage_init_inputs(unet_lib.init_inputs, model_config)


def object_ids(config: ml_collections.ConfigDict, ae: Any, object_masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-cell ids in the U-Net's layout: every TTM level's latent grid `(t, h, w)` row-major, concatenated
    (`unet.object_ids`); cross ids by box or mask (`config.model.cross_ids_from`)."""
    return unet_lib.object_ids(model_config(config), object_masks, time_factor=ae.time_factor,
                               space_factor=ae.space_factor, cross_from_boxes=config.model.cross_ids_from == "bbox")


_UNET_PART = re.compile(r"^((?:down|up)_blocks_\d+|mid_block)_(resnets|attentions|motion_modules|downsamplers|"
                        r"upsamplers)_\d+")


def group(path: tuple[str, ...], depth: int = 2) -> str:
    """The U-Net's flat block names grouped per level and kind (`down_blocks_0/attentions`), TTM's added layers in
    their own row (`down_blocks_0/attentions (TTM layers)`); `depth` unused."""
    m = _UNET_PART.match(path[0])
    if not m:
        return path[0]
    key = f"{m[1]}/{m[2]}"
    return key + " (TTM layers)" if any(p in ("masked_self_attn", "masked_cross_attn") for p in path) else key


BACKBONE = Backbone(
    build=build, init_inputs=init_inputs, object_ids=object_ids,
    state_fields=("model.ttm_layers", "model.param_dtype")
    + tuple(f"model.unet.{k}" for k in unet_config.UNET_STATE_KEYS),
    config_type=unet_lib.UNetConfig, model_config=model_config,
    template=lambda cfg, cin, cout: unet_convert.template(cfg, cin, cout),
    export=unet_export.export, import_folder=unet_export.import_folder, is_folder=unet_export.is_folder,
    converted_config=lambda meta: unet_lib.UNetConfig.from_config(meta["model"]),
    layout="UNetMotionModel", group=group, ttm_where="spatial transformers")
