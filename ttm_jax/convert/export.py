"""Trained TTM stage models out to PyTorch (and back): one reversible rulebook, backbone + TTM layers.

An exported folder (what `ttm_jax.torch.TTMWanTransformer3DModel.from_pretrained` loads):

  config.json                          the backbone's diffusers `WanTransformer3DModel` config; `in_channels` is the
                                       stage's (3 * latent_channels), so `WanTransformer3DModel.from_pretrained` loads
                                       the backbone of any export (a `ttm_layers=0` model with the checkpoint's own
                                       channels is a plain diffusers transformer)
  diffusion_pytorch_model.safetensors  backbone tensors, diffusers' keys
  ttm_layers.safetensors               the added layers, keys `blocks.{i}.masked_{self,cross}_attn.{norm,attn}.*`
                                       (absent when ttm_layers = 0)
  ttm_config.json                      {ttm_layers, ttm_masked, in_channels, out_channels, latent_channels, stage,
                                       condition_frames, scan_layers, param_dtype, format}

The table (`rulebook(cfg)`): the backbone rules (`ttm_jax/backbones/wan/weights.py`), re-based for the stage model's
layout (with `scan_layers=True` the Flax tree has two stacks: `ttm_blocks` = torch blocks `0..K-1` and `blocks` =
torch blocks `K..L-1`, `stack_offset=K`), plus the TTM rules (norm `scale/bias` <-> `weight/bias`, Dense `kernel`
<-> `weight.T`, `attn/to_out` <-> `attn.to_out.0`). Every tensor moves through it one at a time (streamed
safetensors both ways); Flax -> folder -> Flax is bit-identical.

Sources: `workdir:DIR[@STEP]` (a training workdir: Orbax `CheckpointManager` state + the config saved beside it;
the EMA params when the run kept them, `--params=raw` for the raw ones) or `orbax:DIR` (an Orbax params checkpoint,
e.g. `python -m ttm_jax.convert dit`'s `<out>/params`, with its `ttm_convert.json` beside it or `--config`).
This module holds the library functions (`export_params`, `import_folder`, `load_workdir`, `load_orbax_params`,
`stage_dims`); the command line is `python -m ttm_jax.convert export` (`__main__.export_main`).

The AnimateDiff U-Net (`config.model.backbone = "unet"`, a `UNetConfig`) exports the same way, every function
dispatching on the config's type: `config.json` is diffusers' `UNetMotionModel` config with the stage's
`in_channels`, `diffusion_pytorch_model.safetensors` the backbone (`ttm_jax/backbones/animatediff/weights.py`,
frame-embedding buffers
included: `UNetMotionModel.from_pretrained` loads it strictly), `ttm_layers.safetensors` the added layers under
`down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.masked_{self,cross}_attn.{norm,attn}.*` (the same layer
rules as the DiT's), `ttm_config.json` with `backbone: "unet"` and the U-Net's TTM fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ttm_jax import cli
from ttm_jax import config as config_lib
from ttm_jax.assembly import registry
from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.backbones.animatediff import weights as unet_convert
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.runtime import checkpoint as checkpoint_lib
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

TTM_CONFIG_FILE = "ttm_config.json"
TTM_WEIGHTS_FILE = "ttm_layers.safetensors"
FORMAT = "ttm-jax-export/1"
TTM_MODULES = dit_lib.TTM_MODULES


# ----------------------------------------------------------------------------------------------------------- rulebook


def _layer_rules(t: str, f: str, **kw: Any) -> list[rb.Rule]:
    """One added layer: affine LayerNorm `norm` + Wan attention `attn` (q/k/v/out, RMS-normed q/k)."""
    rules = [rb.Rule(f"{t}.norm.weight", f"{f}/norm/scale", **kw), rb.Rule(f"{t}.norm.bias", f"{f}/norm/bias", **kw),
             rb.Rule(f"{t}.attn.norm_q.weight", f"{f}/attn/norm_q/scale", **kw),
             rb.Rule(f"{t}.attn.norm_k.weight", f"{f}/attn/norm_k/scale", **kw)]
    for tp, fp in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
        rules += [rb.Rule(f"{t}.attn.{tp}.weight", f"{f}/attn/{fp}/kernel", rb.LINEAR, **kw),
                  rb.Rule(f"{t}.attn.{tp}.bias", f"{f}/attn/{fp}/bias", **kw)]
    return rules


def ttm_rules(cfg: dit_lib.DiTConfig) -> list[rb.Rule]:
    """The TTM layers' rules for `cfg`'s layout (none when `ttm_layers = 0`)."""
    if not cfg.ttm_layers:
        return []
    rules: list[rb.Rule] = []
    for m in TTM_MODULES:
        if cfg.scan_layers:
            rules += _layer_rules(f"blocks.{{i}}.{m}", f"ttm_blocks/{m}", stack="i")
        else:
            rules += _layer_rules(f"blocks.{{i}}.{m}", f"blocks_{{i}}/{m}")
    return rules


def rulebook(cfg: dit_lib.DiTConfig) -> rb.RuleBook:
    """The whole stage model's table: F's backbone rules in `cfg`'s layout plus `ttm_rules(cfg)`."""
    if not cfg.qk_norm:
        raise cli.BadInput("convert/export.py: config.model.qk_norm=False has no diffusers counterpart (Wan always "
                         "RMS-normalises q and k); export needs qk_norm=True")
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


def is_ttm_path(path: str) -> bool:
    """True for a `/`-joined Flax path inside an added layer."""
    return any(m in path.split("/") for m in TTM_MODULES)


# -------------------------------------------------------------------------------------------------------- flax -> pt


def _ttm_meta(cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int, latent_channels: int | None,
              stage: int | None, condition_frames: str | None, self_condition: bool | None) -> dict[str, Any]:
    return {"format": FORMAT, "ttm_layers": cfg.ttm_layers, "ttm_masked": cfg.ttm_masked, "in_channels": in_channels,
            "out_channels": out_channels, "latent_channels": latent_channels, "stage": stage,
            "condition_frames": condition_frames, "self_condition": self_condition, "scan_layers": cfg.scan_layers,
            "param_dtype": cfg.param_dtype}


def export_params(params: Mapping[str, Any], cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int,
                  out_dir: str, *, latent_channels: int | None = None, stage: int | None = None,
                  dtype: Any = None, condition_frames: str | None = None,
                  self_condition: bool | None = None) -> dict[str, str]:
    """Writes the exported folder (module docstring) from a DiT's params (boxed or not, either layout).
    `condition_frames` (`config.model.condition_frames`, None: unknown) goes into `ttm_config.json`: how the stage
    input's first-frame channels fill the latent frames, which a PyTorch user must build the same way; so does
    `self_condition` (`config.model.self_condition`, None: unknown): whether the input carries the previous sampling
    step's clean estimate after the noisy latent.

    The whole plan (every Flax param mapped, every shape) is checked before a file is written; tensors then stream
    one at a time. `dtype` (e.g. "bfloat16") casts on the way; None keeps the params' dtypes. Returns {name: path}.
    """
    if isinstance(cfg, unet_lib.UNetConfig):
        return export_unet(params, cfg, in_channels, out_channels, out_dir, latent_channels=latent_channels,
                           stage=stage, dtype=dtype, condition_frames=condition_frames,
                           self_condition=self_condition)
    book = rulebook(cfg)
    flat = rb.flatten(params)
    book.plan(flat, None, "flax -> torch")  # raises listing every unmapped param before anything is written
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, dit_convert.CONFIG_FILE), "w") as fh:
        json.dump(dit_convert.diffusers_config(cfg, in_channels, out_channels), fh, indent=2)
    with open(os.path.join(out_dir, TTM_CONFIG_FILE), "w") as fh:
        json.dump(_ttm_meta(cfg, in_channels, out_channels, latent_channels, stage, condition_frames, self_condition),
                  fh, indent=2)
    paths = {"config": os.path.join(out_dir, dit_convert.CONFIG_FILE), "ttm_config": os.path.join(out_dir,
                                                                                                     TTM_CONFIG_FILE)}
    parts = [(dit_convert.WEIGHTS_FILE, {p: v for p, v in flat.items() if not is_ttm_path(p)}),
             (TTM_WEIGHTS_FILE, {p: v for p, v in flat.items() if is_ttm_path(p)})]
    stale = os.path.join(out_dir, TTM_WEIGHTS_FILE)
    if not parts[1][1] and os.path.exists(stale):
        os.remove(stale)  # a re-export without TTM layers must not leave an old file behind
    for file_name, part in parts:
        if not part:
            continue
        moves = book.plan(part, None, "flax -> torch")
        specs = {mv.torch_key: (mv.torch_shape, rb.as_dtype(dtype if dtype is not None else part[mv.flax_path].dtype))
                 for mv in moves}
        tensors = book.iter_torch(rb.unflatten(part))
        if dtype is not None:
            tensors = ((k, v.astype(rb.as_dtype(dtype))) for k, v in tensors)
        path = os.path.join(out_dir, file_name)
        safetensors_io.write_safetensors(path, specs, tensors, metadata={"format": "pt"})
        paths[file_name] = path
    return paths


# -------------------------------------------------------------------------------------------------------- pt -> flax


# ------------------------------------------------------------------------------------------------------------ U-Net


def unet_ttm_rules(cfg: unet_lib.UNetConfig) -> list[rb.Rule]:
    """The U-Net's added layers: every transformer block of the TTM spatial transformers
    (`down_blocks_{i}_attentions_{j}/transformer_blocks_{k}/masked_*`), the DiT's layer rules (`_layer_rules`)."""
    if not cfg.ttm_layers:
        return []
    rules: list[rb.Rule] = []
    for m in TTM_MODULES:
        rules += _layer_rules(f"down_blocks.{{i}}.attentions.{{j}}.transformer_blocks.{{k}}.{m}",
                              f"down_blocks_{{i}}_attentions_{{j}}/transformer_blocks_{{k}}/{m}")
    return rules


def unet_rulebook(cfg: unet_lib.UNetConfig) -> rb.RuleBook:
    """The U-Net stage model's table: the backbone's (`ttm_jax/backbones/animatediff/weights.py`, frame-embedding
    buffers ignored) with its
    TTM `FlaxOnly` entries replaced by `unet_ttm_rules(cfg)`."""
    backbone = unet_convert.rulebook(cfg)
    rules: list[Any] = [*backbone.rules, *backbone.ignores, *unet_ttm_rules(cfg)]
    return rb.RuleBook(f"ttm_unet(ttm_layers={cfg.ttm_layers})", rules)


def _unet_meta(cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int, latent_channels: int | None,
               stage: int | None, condition_frames: str | None, self_condition: bool | None) -> dict[str, Any]:
    return {"format": FORMAT, "backbone": "unet", "ttm_layers": cfg.ttm_layers, "ttm_masked": cfg.ttm_masked,
            "ttm_masked_self": cfg.ttm_masked_self, "ttm_masked_cross": cfg.ttm_masked_cross,
            "ttm_self_across_frames": cfg.ttm_self_across_frames, "ttm_qk_norm": cfg.ttm_qk_norm,
            "in_channels": in_channels, "out_channels": out_channels, "latent_channels": latent_channels,
            "stage": stage, "condition_frames": condition_frames, "self_condition": self_condition,
            "param_dtype": cfg.param_dtype}


def export_unet(params: Mapping[str, Any], cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int,
                out_dir: str, *, latent_channels: int | None = None, stage: int | None = None,
                dtype: Any = None, condition_frames: str | None = None,
                self_condition: bool | None = None) -> dict[str, str]:
    """A U-Net stage's params -> the exported folder (module docstring): the backbone as a `UNetMotionModel` folder
    (`weights/unet.save_diffusers_folder`), the added layers beside it. The whole plan is checked first; `dtype`
    casts (None: as stored). Returns {name: path}."""
    book = unet_rulebook(cfg)
    flat = rb.flatten(params)
    book.plan(flat, None, "flax -> torch")  # every param mapped, before anything is written
    if dtype is not None:
        flat = {k: np.asarray(v).astype(rb.as_dtype(dtype)) for k, v in flat.items()}
    backbone = {p: v for p, v in flat.items() if not is_ttm_path(p)}
    added = {p: v for p, v in flat.items() if is_ttm_path(p)}
    os.makedirs(out_dir, exist_ok=True)
    weights = unet_convert.save_diffusers_folder(rb.unflatten(backbone), dataclasses.replace(cfg, ttm_layers=0),
                                                 in_channels, out_channels, out_dir)
    with open(os.path.join(out_dir, TTM_CONFIG_FILE), "w") as fh:
        json.dump(_unet_meta(cfg, in_channels, out_channels, latent_channels, stage, condition_frames, self_condition),
                  fh, indent=2)
    paths = {"config": os.path.join(out_dir, unet_convert.CONFIG_FILE),
             "ttm_config": os.path.join(out_dir, TTM_CONFIG_FILE), unet_convert.WEIGHTS_FILE: weights}
    stale = os.path.join(out_dir, TTM_WEIGHTS_FILE)
    if not added:
        if os.path.exists(stale):
            os.remove(stale)  # a re-export without TTM layers must not leave an old file behind
        return paths
    moves = book.plan(added, None, "flax -> torch")
    specs = {mv.torch_key: (mv.torch_shape, rb.as_dtype(added[mv.flax_path].dtype)) for mv in moves}
    safetensors_io.write_safetensors(stale, specs, book.iter_torch(rb.unflatten(added)), metadata={"format": "pt"})
    paths[TTM_WEIGHTS_FILE] = stale
    return paths


def _is_unet_folder(folder: str) -> bool:
    file = os.path.join(folder, TTM_CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            if json.load(fh).get("backbone", "dit") == "unet":
                return True
    file = os.path.join(folder, unet_convert.CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            return json.load(fh).get("_class_name") == "UNetMotionModel"
    return False


def import_unet_folder(folder: str, *, param_dtype: str = "float32"
                       ) -> tuple[unet_lib.UNetConfig, int, int, dict[str, Any]]:
    """An exported U-Net folder (or a plain `UNetMotionModel` folder) -> (UNetConfig with the folder's TTM fields,
    in, out, unboxed params), streamed; every tensor mapped, every param filled."""
    cfg, cin, cout = unet_convert.read_config(folder, param_dtype=param_dtype)
    meta: dict[str, Any] = {"ttm_layers": 0}
    file = os.path.join(folder, TTM_CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            meta.update(json.load(fh))
        if meta.get("in_channels") is not None and int(meta["in_channels"]) != cin:
            raise cli.BadInput(f"{file}: in_channels={meta['in_channels']} but {folder}/config.json has {cin}; "
                             f"re-export the folder (python -m ttm_jax.convert export)")
    ttm = {k: meta[k] for k in ("ttm_layers", "ttm_masked", "ttm_masked_self", "ttm_masked_cross",
                                "ttm_self_across_frames", "ttm_qk_norm") if k in meta}
    cfg = dataclasses.replace(cfg, **ttm)
    files = [os.path.join(folder, unet_convert.WEIGHTS_FILE)]
    if cfg.ttm_layers:
        files.append(os.path.join(folder, TTM_WEIGHTS_FILE))
    for f in files:
        if not os.path.exists(f):
            raise cli.MissingInput(f"{f}: missing; {folder}/{TTM_CONFIG_FILE} says ttm_layers={cfg.ttm_layers}. "
                                    f"Re-export the folder (python -m ttm_jax.convert export)")
    reader = safetensors_io.MultiFileReader(files)
    params = rb.stream_to_flax(unet_rulebook(cfg), reader, unet_convert.template(cfg, cin, cout))
    return cfg, cin, cout, params


def backbone_of(cfg: Any) -> str:
    """The `config.model.backbone` name of a frozen backbone config (`DiTConfig` -> "dit", `UNetConfig` -> "unet")."""
    return "unet" if isinstance(cfg, unet_lib.UNetConfig) else "dit"


def template(cfg: Any, in_channels: int, out_channels: int) -> Any:
    """The unboxed parameter tree of `cfg`'s model as `jax.ShapeDtypeStruct`s."""
    if isinstance(cfg, unet_lib.UNetConfig):
        return unet_convert.template(cfg, in_channels, out_channels)
    return dit_convert.template(cfg, in_channels, out_channels)


def converted_dims(params_path: str) -> tuple[Any, int, int]:
    """(DiTConfig or UNetConfig, in_channels, out_channels) of a converted checkpoint, from its `ttm_convert.json`."""
    meta = dit_convert.read_converted_meta(params_path)
    if meta["backbone"] == "unet":
        return unet_lib.UNetConfig.from_config(meta["model"]), int(meta["in_channels"]), int(meta["out_channels"])
    return dit_convert.read_converted(params_path)


def read_folder_config(folder: str, *, scan_layers: bool = True,
                       param_dtype: str = "float32") -> tuple[dit_lib.DiTConfig, int, int, dict[str, Any]]:
    """(DiTConfig with the folder's ttm_layers / ttm_masked, in_channels, out_channels, ttm_config dict)."""
    cfg, cin, cout = dit_convert.read_config(folder, scan_layers=scan_layers, param_dtype=param_dtype)
    meta: dict[str, Any] = {"ttm_layers": 0, "ttm_masked": True}
    file = os.path.join(folder, TTM_CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            meta.update(json.load(fh))
        if meta.get("in_channels") is not None and int(meta["in_channels"]) != cin:
            raise cli.BadInput(f"{file}: in_channels={meta['in_channels']} but {folder}/config.json has {cin}; "
                             f"re-export the folder (python -m ttm_jax.convert export)")
    cfg = dataclasses.replace(cfg, ttm_layers=int(meta["ttm_layers"]), ttm_masked=bool(meta["ttm_masked"]))
    return cfg, cin, cout, meta


def import_folder(folder: str, *, scan_layers: bool = True,
                  param_dtype: str = "float32") -> tuple[dit_lib.DiTConfig, int, int, dict[str, Any]]:
    """An exported folder (or a plain diffusers Wan transformer folder) -> (config, in, out, unboxed params),
    streamed tensor by tensor into the `scan_layers` layout; every tensor must be mapped, every param filled. A U-Net
    folder (`ttm_config.json` with `backbone: "unet"`, or a `UNetMotionModel` config.json) goes to
    `import_unet_folder`."""
    if _is_unet_folder(folder):
        return import_unet_folder(folder, param_dtype=param_dtype)
    cfg, cin, cout, _ = read_folder_config(folder, scan_layers=scan_layers, param_dtype=param_dtype)
    files = [os.path.join(folder, dit_convert.WEIGHTS_FILE)]
    if cfg.ttm_layers:
        files.append(os.path.join(folder, TTM_WEIGHTS_FILE))
    for f in files:
        if not os.path.exists(f):
            raise cli.MissingInput(f"{f}: missing; {folder}/{TTM_CONFIG_FILE} says ttm_layers={cfg.ttm_layers}. "
                                    f"Re-export the folder (python -m ttm_jax.convert export)")
    params = rb.stream_to_flax(rulebook(cfg), safetensors_io.MultiFileReader(files),
                               dit_convert.template(cfg, cin, cout))
    return cfg, cin, cout, params


# ------------------------------------------------------------------------------------------------------------ sources


def load_orbax_params(path: str, cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int) -> dict[str, Any]:
    """An Orbax params checkpoint (`ocp.StandardCheckpointer`, e.g. `python -m ttm_jax.convert dit`) -> unboxed
    params of `cfg`'s shapes, on the first local device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                            template(cfg, in_channels, out_channels))
    return checkpoint_lib.restore_tree(path, abstract, field="--from=orbax:",
                                       fix=f"is it an Orbax params checkpoint of DiT config {cfg} (check --config / "
                                           f"ttm_convert.json)?")


def load_workdir(workdir: str, *, step: int | None = None, ema: bool = True) -> tuple[Any, dict[str, Any], int]:
    """(config, unboxed params, step) of a training workdir's checkpoint (latest when `step` is None): the EMA params
    when the run kept them and `ema`, else the raw ones. Only that subtree is read (`checkpoint.restore_params`: no
    optimizer state), onto the first local device, whatever mesh wrote it."""
    config, params, step, _ = checkpoint_lib.restore_params(workdir, step, ema=ema)
    return config, params, int(step)


def stage_dims(config: ml_collections.ConfigDict) -> tuple[dit_lib.DiTConfig, int, int, int, int]:
    """(DiTConfig, in_channels, out_channels, latent_channels, stage) of a stage config (a training run's, or the
    `--config` of an Orbax source): the DiT reads `ttm_jax.config.in_channels(config)` channels and predicts
    `latent_channels` ones. A `backbone="unet"` config gives its `UNetConfig` (`registry.unet_config`) instead."""
    lat = int(config.autoencoder.latent_channels)
    if registry.backbone_name(config) == "unet":
        cfg: Any = registry.unet_config(config)
    else:
        cfg = dit_lib.DiTConfig.from_config(config.model)
    return cfg, config_lib.in_channels(config), lat, lat, int(config.stage)

