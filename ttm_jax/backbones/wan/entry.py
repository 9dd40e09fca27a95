"""The Wan DiT's registry entry (`config.model.backbone = "dit"`; `assembly/registry.py` registers `BACKBONE`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections

from ttm_jax import config as config_lib
from ttm_jax.assembly.backbone import Backbone, stage_init_inputs
from ttm_jax.backbones.wan import export as wan_export
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.models import masks


def model_config(config: ml_collections.ConfigDict) -> dit_lib.DiTConfig:
    return dit_lib.DiTConfig.from_config(config.model)


def build(config: ml_collections.ConfigDict) -> nn.Module:
    return dit_lib.DiT(config.model, config_lib.in_channels(config), config.autoencoder.latent_channels)


# the smallest inputs: one patch (`full=False`); or the configured latent grid
init_inputs = stage_init_inputs(dit_lib.init_inputs, model_config)


def object_ids(config: ml_collections.ConfigDict, ae: Any, object_masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token ids in the DiT's `(t, h, w)` patch order: by area majority for masked self-attention, by box or mask
    (`config.model.cross_ids_from`) for masked cross-attention (`ttm_jax/models/masks.py`)."""
    geometry = dict(time_factor=ae.time_factor, space_factor=ae.space_factor,
                    patch_size=tuple(config.model.patch_size))
    by = masks.token_ids_from_boxes if config.model.cross_ids_from == "bbox" else masks.token_ids_from_masks
    return masks.token_ids_from_masks(object_masks, **geometry), by(object_masks, **geometry)


def _group(path: tuple[str, ...], depth: int) -> str:
    return "/".join(path[:depth]) if len(path) > depth else "/".join(path[:-1]) or path[0]


BACKBONE = Backbone(
    build=build, init_inputs=init_inputs, object_ids=object_ids,
    state_fields=tuple(f"model.{k}" for k in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim",
                                              "ttm_layers", "patch_size", "qk_norm", "cross_attn_norm",
                                              "scan_layers", "param_dtype")),
    config_type=dit_lib.DiTConfig, model_config=model_config, template=dit_convert.template,
    export=wan_export.export, import_folder=wan_export.import_folder,
    converted_config=lambda meta: dit_lib.DiTConfig.from_config(meta["model"]),
    layout="Wan 2.1 layout", group=_group, ttm_where="blocks")
