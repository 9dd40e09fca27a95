"""`Backbone`: what a trained model family registers (`registry.BACKBONES`), one entry per family, defined in the
family's folder (`ttm_jax/backbones/<family>/entry.py`). Apart from `registry.py` so that an entry can be built
without importing the registry that imports it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from ttm_jax import config as config_lib


def group_by_depth(path: tuple[str, ...], depth: int) -> str:
    """A parameter's row in `describe`'s module table: its first `depth` path parts (its module's path when it is
    shallower)."""
    return "/".join(path[:depth]) if len(path) > depth else "/".join(path[:-1]) or path[0]


def latent_cells(config: ml_collections.ConfigDict) -> int:
    """Video tokens per example of a backbone that reads every latent cell as a token (the U-Net): T' x H' x W'."""
    t, h, w = config_lib.latent_shape(config)[:3]
    return t * h * w


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A trained model family.

    build: `config -> nn.Module` with the call `(x, timestep, context, **kwargs) -> [B, T', H', W', C]`.
    init_inputs: `(config, *, batch, full, abstract) -> (args, kwargs)` for `init`/`apply`: the smallest inputs that
      build every parameter (`full=False`), or inputs of the configured clip size (`full=True`, for FLOPs).
    object_ids: `(config, autoencoder, object_masks bool [B, T, H, W, K]) -> (token_ids, cross_token_ids)`, the
      per-token object ids of the added layers in the backbone's own token layout (None: no added layers).
    state_fields: config fields that fix the shapes of the backbone's parameters (a resume must keep them).

    The TTM export (`convert/export.py`, the format in `weights/ttm_export.py`) and the converted checkpoints:
    config_type: the frozen config dataclass of the family's model (`DiTConfig`): a `cfg` of this type is this
      backbone's.
    model_config: `config -> config_type` (the backbone's frozen config from a stage config).
    template: `(cfg, in_channels, out_channels) -> unboxed param tree of jax.ShapeDtypeStruct`.
    export: `(params, cfg, in_channels, out_channels, out_dir, *, meta, dtype) -> {name: path}`, the exported folder
      (`meta`: the stage's fields of `ttm_config.json`).
    import_folder: `(folder, *, scan_layers, param_dtype) -> (cfg, in_channels, out_channels, params)`.
    is_folder: `folder -> bool`, the folder is this backbone's (None: the backbone of folders no entry claims).
    converted_config: `ttm_convert.json`'s dict -> `config_type` (a converted Orbax checkpoint's config).

    `describe` (which has no branch on the backbone; it reads these):
    layout: how the parameter layout is named ("Wan 2.1 layout").
    group: `(param path, depth) -> row` of the module table (default `group_by_depth`, the first `depth` parts).
    ttm_where: what holds the added layers ("blocks").
    video_tokens: `config -> int`, the video tokens of one example (default `latent_cells`; the DiT's patches).
    flops_overrides: `config.model` values the FLOPs are counted with (XLA's cost analysis counts a `while` body
      once, so a backbone that scans its layers unrolls them there: the DiT's `scan_layers=False`).
    activations: `(config, tokens per device, mesh tensor size) -> (bytes per device, how)`, the estimate of the
      activations a training step saves (None: not estimated).
    """

    build: Callable[[ml_collections.ConfigDict], nn.Module]
    init_inputs: Callable[..., tuple[tuple, dict[str, Any]]]
    object_ids: Callable[..., tuple[jax.Array, jax.Array]] | None = None
    state_fields: tuple[str, ...] = ()
    config_type: type | None = None
    model_config: Callable[[ml_collections.ConfigDict], Any] | None = None
    template: Callable[[Any, int, int], Any] | None = None
    export: Callable[..., dict[str, str]] | None = None
    import_folder: Callable[..., tuple[Any, int, int, Any]] | None = None
    is_folder: Callable[[str], bool] | None = None
    converted_config: Callable[[dict[str, Any]], Any] | None = None
    layout: str = "its own layout"
    group: Callable[[tuple[str, ...], int], str] = group_by_depth
    ttm_where: str = "blocks"
    video_tokens: Callable[[ml_collections.ConfigDict], int] = latent_cells
    flops_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    activations: Callable[[ml_collections.ConfigDict, int, int], tuple[int, str]] | None = None


def stage_init_inputs(model_init_inputs: Callable[..., tuple[tuple, dict[str, Any]]],
                      model_config: Callable[[ml_collections.ConfigDict], Any]) -> Callable[..., tuple[tuple, dict]]:
    """`Backbone.init_inputs` of a family whose model module has `init_inputs(cfg, in_channels, *, batch, grid,
    text_len, local_len, abstract)` (the DiT's, the U-Net's): the model's smallest inputs (`full=False`) or the
    configured latent grid (`full=True`); text at `max_length`, local prompts at `(K+1) * Lp`, as training feeds
    them."""

    def init_inputs(config: ml_collections.ConfigDict, *, batch: int = 1, full: bool = False,
                    abstract: bool = False) -> tuple[tuple, dict[str, Any]]:
        t = config.text_encoder
        grid = config_lib.latent_shape(config)[:3] if full else None
        local_len = (int(config.data.max_objects) + 1) * int(t.local_max_length)
        return model_init_inputs(model_config(config), config_lib.in_channels(config), batch=batch, grid=grid,
                                 text_len=int(t.max_length), local_len=local_len, abstract=abstract)

    return init_inputs
