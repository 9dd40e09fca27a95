"""The Wan DiT's TTM export (`ttm_jax/weights/ttm_export.py`'s format): `config.json` is diffusers'
`WanTransformer3DModel` config with the stage's `in_channels` (so `WanTransformer3DModel.from_pretrained` loads the
backbone of any export), `diffusion_pytorch_model.safetensors` the backbone under diffusers' keys,
`ttm_layers.safetensors` the added layers under `blocks.{i}.masked_{self,cross}_attn.{norm,attn}.*`, `ttm_config.json`
{ttm_layers, ttm_masked, in/out/latent channels, stage, condition_frames, self_condition, scan_layers, param_dtype}.
`ttm_jax.torch.TTMWanTransformer3DModel` (`torch_model.py`) loads and writes the same folder.

The table (`rulebook(cfg)`): the backbone rules (`weights.py`), re-based for the stage model's layout (with
`scan_layers=True` the Flax tree has two stacks: `ttm_blocks` = torch blocks `0..K-1` and `blocks` = torch blocks
`K..L-1`, `stack_offset=K`), plus the TTM rules. Every tensor moves through it one at a time (streamed safetensors
both ways); Flax -> folder -> Flax is bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from ttm_jax import cli
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io, ttm_export


def ttm_rules(cfg: dit_lib.DiTConfig) -> list[rb.Rule]:
    """The TTM layers' rules for `cfg`'s layout (none when `ttm_layers = 0`)."""
    if not cfg.ttm_layers:
        return []
    rules: list[rb.Rule] = []
    for m in ttm_export.TTM_MODULES:
        if cfg.scan_layers:
            rules += ttm_export.layer_rules(f"blocks.{{i}}.{m}", f"ttm_blocks/{m}", stack="i")
        else:
            rules += ttm_export.layer_rules(f"blocks.{{i}}.{m}", f"blocks_{{i}}/{m}")
    return rules


def rulebook(cfg: dit_lib.DiTConfig) -> rb.RuleBook:
    """The whole stage model's table: the backbone rules in `cfg`'s layout plus `ttm_rules(cfg)`."""
    if not cfg.qk_norm:
        raise cli.BadInput("ttm_jax/backbones/wan/export.py: config.model.qk_norm=False has no diffusers counterpart "
                           "(Wan always RMS-normalises q and k); export needs qk_norm=True")
    backbone = dit_convert.rulebook(cfg.scan_layers)
    rules: list[Any] = list(backbone.ignores)
    for rule in backbone.rules:
        if cfg.scan_layers and cfg.ttm_layers and rule.stack is not None:
            # torch blocks 0..K-1 live in the `ttm_blocks` stack, K..L-1 in `blocks`
            ttm_flax = tuple("ttm_" + p for p in rule.flax_patterns)
            rules.append(dataclasses.replace(rule, flax=ttm_flax if len(ttm_flax) > 1 else ttm_flax[0]))
            rules.append(dataclasses.replace(rule, stack_offset=cfg.ttm_layers))
        else:
            rules.append(rule)
    rules += ttm_rules(cfg)
    name = f"ttm_dit(scan_layers={cfg.scan_layers}, ttm_layers={cfg.ttm_layers})"
    return rb.RuleBook(name, rules)


def export(params: Mapping[str, Any], cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int, out_dir: str, *,
           meta: dict[str, Any], dtype: Any = None) -> dict[str, str]:
    """A DiT stage's params (boxed or not, either layout) -> the exported folder; `meta` (the stage's fields of
    `ttm_config.json`) joins the DiT's own. The whole plan is checked before a file is written; `dtype` casts (None:
    as stored). Returns {name: path}."""
    book = rulebook(cfg)
    flat = rb.flatten(params)
    book.plan(flat, None, "flax -> torch")  # raises listing every unmapped param before anything is written
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, dit_convert.CONFIG_FILE)
    with open(config_path, "w") as fh:
        json.dump(dit_convert.diffusers_config(cfg, in_channels, out_channels), fh, indent=2)
    ttm_config = ttm_export.write_ttm_config(out_dir, {
        "ttm_layers": cfg.ttm_layers, "ttm_masked": cfg.ttm_masked, "in_channels": in_channels,
        "out_channels": out_channels, **meta, "scan_layers": cfg.scan_layers, "param_dtype": cfg.param_dtype})
    paths = {"config": config_path, "ttm_config": ttm_config}
    backbone = {p: v for p, v in flat.items() if not ttm_export.is_ttm_path(p)}
    weights = os.path.join(out_dir, dit_convert.WEIGHTS_FILE)
    ttm_export.write_part(weights, book, backbone, dtype)
    paths[dit_convert.WEIGHTS_FILE] = weights
    added = ttm_export.write_ttm_weights(out_dir, book, {p: v for p, v in flat.items() if ttm_export.is_ttm_path(p)},
                                         dtype)
    if added:
        paths[ttm_export.TTM_WEIGHTS_FILE] = added
    return paths


def read_folder_config(folder: str, *, scan_layers: bool = True,
                       param_dtype: str = "float32") -> tuple[dit_lib.DiTConfig, int, int, dict[str, Any]]:
    """(DiTConfig with the folder's ttm_layers / ttm_masked, in_channels, out_channels, ttm_config dict)."""
    cfg, cin, cout = dit_convert.read_config(folder, scan_layers=scan_layers, param_dtype=param_dtype)
    meta = ttm_export.read_ttm_config(folder, cin, {"ttm_layers": 0, "ttm_masked": True})
    cfg = dataclasses.replace(cfg, ttm_layers=int(meta["ttm_layers"]), ttm_masked=bool(meta["ttm_masked"]))
    return cfg, cin, cout, meta


def import_folder(folder: str, *, scan_layers: bool = True,
                  param_dtype: str = "float32") -> tuple[dit_lib.DiTConfig, int, int, dict[str, Any]]:
    """An exported folder (or a plain diffusers Wan transformer folder) -> (config, in, out, unboxed params),
    streamed tensor by tensor into the `scan_layers` layout; every tensor must be mapped, every param filled."""
    cfg, cin, cout, _ = read_folder_config(folder, scan_layers=scan_layers, param_dtype=param_dtype)
    files = ttm_export.weight_files(folder, dit_convert.WEIGHTS_FILE, cfg.ttm_layers)
    params = rb.stream_to_flax(rulebook(cfg), safetensors_io.MultiFileReader(files),
                               dit_convert.template(cfg, cin, cout))
    return cfg, cin, cout, params
