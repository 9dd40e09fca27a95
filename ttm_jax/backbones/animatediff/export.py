"""The AnimateDiff U-Net's TTM export (`ttm_jax/weights/ttm_export.py`'s format): `config.json` is diffusers'
`UNetMotionModel` config with the stage's `in_channels`, `diffusion_pytorch_model.safetensors` the backbone
(`weights.py`, frame-embedding buffers included: `UNetMotionModel.from_pretrained` loads it strictly),
`ttm_layers.safetensors` the added layers under
`down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.masked_{self,cross}_attn.{norm,attn}.*` (the same layer rules
as the DiT's), `ttm_config.json` with `backbone: "unet"` and the U-Net's TTM fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.backbones.animatediff import weights as unet_convert
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io, ttm_export

_TTM_FIELDS = ("ttm_layers", "ttm_masked", "ttm_masked_self", "ttm_masked_cross", "ttm_self_across_frames",
               "ttm_qk_norm")


def ttm_rules(cfg: unet_lib.UNetConfig) -> list[rb.Rule]:
    """The U-Net's added layers: every transformer block of the TTM spatial transformers
    (`down_blocks_{i}_attentions_{j}/transformer_blocks_{k}/masked_*`), the shared layer rules."""
    if not cfg.ttm_layers:
        return []
    rules: list[rb.Rule] = []
    for m in ttm_export.TTM_MODULES:
        rules += ttm_export.layer_rules(f"down_blocks.{{i}}.attentions.{{j}}.transformer_blocks.{{k}}.{m}",
                                        f"down_blocks_{{i}}_attentions_{{j}}/transformer_blocks_{{k}}/{m}")
    return rules


def rulebook(cfg: unet_lib.UNetConfig) -> rb.RuleBook:
    """The U-Net stage model's table: the backbone's (`weights.py`, frame-embedding buffers ignored) with its TTM
    `FlaxOnly` entries replaced by `ttm_rules(cfg)`."""
    backbone = unet_convert.rulebook(cfg)
    rules: list[Any] = [*backbone.rules, *backbone.ignores, *ttm_rules(cfg)]
    return rb.RuleBook(f"ttm_unet(ttm_layers={cfg.ttm_layers})", rules)


def export(params: Mapping[str, Any], cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int, out_dir: str,
           *, meta: dict[str, Any], dtype: Any = None) -> dict[str, str]:
    """A U-Net stage's params -> the exported folder: the backbone as a `UNetMotionModel` folder
    (`weights.save_diffusers_folder`), the added layers beside it; `meta` (the stage's fields of `ttm_config.json`)
    joins the U-Net's own. The whole plan is checked first; `dtype` casts (None: as stored). Returns {name: path}."""
    book = rulebook(cfg)
    flat = rb.flatten(params)
    book.plan(flat, None, "flax -> torch")  # every param mapped, before anything is written
    if dtype is not None:
        flat = {k: np.asarray(v).astype(rb.as_dtype(dtype)) for k, v in flat.items()}
    backbone = {p: v for p, v in flat.items() if not ttm_export.is_ttm_path(p)}
    added = {p: v for p, v in flat.items() if ttm_export.is_ttm_path(p)}
    os.makedirs(out_dir, exist_ok=True)
    weights = unet_convert.save_diffusers_folder(rb.unflatten(backbone), dataclasses.replace(cfg, ttm_layers=0),
                                                 in_channels, out_channels, out_dir)
    ttm_config = ttm_export.write_ttm_config(out_dir, {
        "backbone": "unet", **{k: getattr(cfg, k) for k in _TTM_FIELDS}, "in_channels": in_channels,
        "out_channels": out_channels, **meta, "param_dtype": cfg.param_dtype})
    paths = {"config": os.path.join(out_dir, unet_convert.CONFIG_FILE), "ttm_config": ttm_config,
             unet_convert.WEIGHTS_FILE: weights}
    path = ttm_export.write_ttm_weights(out_dir, book, added)
    if path:
        paths[ttm_export.TTM_WEIGHTS_FILE] = path
    return paths


def is_folder(folder: str) -> bool:
    """An exported U-Net folder (`ttm_config.json` with `backbone: "unet"`) or a plain `UNetMotionModel` one."""
    file = os.path.join(folder, ttm_export.TTM_CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            if json.load(fh).get("backbone", "dit") == "unet":
                return True
    file = os.path.join(folder, unet_convert.CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            return json.load(fh).get("_class_name") == "UNetMotionModel"
    return False


def import_folder(folder: str, *, scan_layers: bool = True, param_dtype: str = "float32"
                  ) -> tuple[unet_lib.UNetConfig, int, int, dict[str, Any]]:
    """An exported U-Net folder (or a plain `UNetMotionModel` folder) -> (UNetConfig with the folder's TTM fields,
    in, out, unboxed params), streamed; every tensor mapped, every param filled (`scan_layers`: unused, the U-Net
    has one layout)."""
    del scan_layers
    cfg, cin, cout = unet_convert.read_config(folder, param_dtype=param_dtype)
    meta = ttm_export.read_ttm_config(folder, cin, {"ttm_layers": 0})
    cfg = dataclasses.replace(cfg, **{k: meta[k] for k in _TTM_FIELDS if k in meta})
    files = ttm_export.weight_files(folder, unet_convert.WEIGHTS_FILE, cfg.ttm_layers)
    params = rb.stream_to_flax(rulebook(cfg), safetensors_io.MultiFileReader(files),
                               unet_convert.template(cfg, cin, cout))
    return cfg, cin, cout, params
