"""Trained TTM stage models out to PyTorch (and back), whatever the backbone: each function dispatches through the
backbone's registry entry (`assembly/registry.py`: `Backbone.export`, `import_folder`, `template`, ...).

An exported folder (the format: `ttm_jax/weights/ttm_export.py`): the backbone in diffusers' own layout
(`config.json` with the stage's `in_channels`, `diffusion_pytorch_model.safetensors`), the added layers in
`ttm_layers.safetensors` (absent when ttm_layers = 0) and `ttm_config.json` {format, the TTM fields, in/out/latent
channels, stage, condition_frames, self_condition, ...}. The Wan DiT's: `ttm_jax/backbones/wan/export.py` (what
`ttm_jax.torch.TTMWanTransformer3DModel.from_pretrained` loads); the AnimateDiff U-Net's (a `UNetMotionModel`
folder, `backbone: "unet"` in `ttm_config.json`): `ttm_jax/backbones/animatediff/export.py`. Every tensor moves
through the backbone's reversible rulebook one at a time (streamed safetensors both ways); Flax -> folder -> Flax is
bit-identical.

Sources: `workdir:DIR[@STEP]` (a training workdir: Orbax `CheckpointManager` state + the config saved beside it;
the EMA params when the run kept them, `--params=raw` for the raw ones) or `orbax:DIR` (an Orbax params checkpoint,
e.g. `python -m ttm_jax.convert dit`'s `<out>/params`, with its `ttm_convert.json` beside it or `--config`).
This module holds the library functions (`export_params`, `import_folder`, `load_workdir`, `load_orbax_params`,
`stage_dims`); the command line is `python -m ttm_jax.convert export` (`__main__.export_main`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from ttm_jax import config as config_lib
from ttm_jax.assembly import registry
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.runtime import checkpoint as checkpoint_lib


def export_params(params: Mapping[str, Any], cfg: Any, in_channels: int, out_channels: int, out_dir: str, *,
                  latent_channels: int | None = None, stage: int | None = None, dtype: Any = None,
                  condition_frames: str | None = None, self_condition: bool | None = None) -> dict[str, str]:
    """Writes the exported folder (module docstring) from a stage model's params (boxed or not), the backbone's
    `Backbone.export` chosen by `cfg`'s type. `condition_frames` (`config.model.condition_frames`, None: unknown) goes
    into `ttm_config.json`: how the stage input's first-frame channels fill the latent frames, which a PyTorch user
    must build the same way; so does `self_condition` (`config.model.self_condition`, None: unknown): whether the
    input carries the previous sampling step's clean estimate after the noisy latent.

    The whole plan (every Flax param mapped, every shape) is checked before a file is written; tensors then stream
    one at a time. `dtype` (e.g. "bfloat16") casts on the way; None keeps the params' dtypes. Returns {name: path}.
    """
    meta = {"latent_channels": latent_channels, "stage": stage, "condition_frames": condition_frames,
            "self_condition": self_condition}
    entry = registry.BACKBONES.get(registry.backbone_of(cfg))
    return entry.export(params, cfg, in_channels, out_channels, out_dir, meta=meta, dtype=dtype)


def import_folder(folder: str, *, scan_layers: bool = True,
                  param_dtype: str = "float32") -> tuple[Any, int, int, dict[str, Any]]:
    """An exported folder (or a plain diffusers folder of a registered backbone) -> (config, in, out, unboxed params),
    streamed tensor by tensor (the DiT's into the `scan_layers` layout); every tensor must be mapped, every param
    filled. The backbone is the one whose entry claims the folder (`registry.folder_backbone`)."""
    entry = registry.BACKBONES.get(registry.folder_backbone(folder))
    return entry.import_folder(folder, scan_layers=scan_layers, param_dtype=param_dtype)


def backbone_of(cfg: Any) -> str:
    """The `config.model.backbone` name of a frozen backbone config (`DiTConfig` -> "dit", `UNetConfig` -> "unet")."""
    return registry.backbone_of(cfg)


def template(cfg: Any, in_channels: int, out_channels: int) -> Any:
    """The unboxed parameter tree of `cfg`'s model as `jax.ShapeDtypeStruct`s."""
    return registry.BACKBONES.get(registry.backbone_of(cfg)).template(cfg, in_channels, out_channels)


def converted_dims(params_path: str) -> tuple[Any, int, int]:
    """(the backbone's frozen config, in_channels, out_channels) of a converted checkpoint, from its
    `ttm_convert.json`."""
    meta = dit_convert.read_converted_meta(params_path)
    cfg = registry.BACKBONES.get(meta["backbone"]).converted_config(meta)
    return cfg, int(meta["in_channels"]), int(meta["out_channels"])


# ------------------------------------------------------------------------------------------------------------ sources


def load_orbax_params(path: str, cfg: Any, in_channels: int, out_channels: int) -> dict[str, Any]:
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


def stage_dims(config: ml_collections.ConfigDict) -> tuple[Any, int, int, int, int]:
    """(the backbone's frozen config, in_channels, out_channels, latent_channels, stage) of a stage config (a
    training run's, or the `--config` of an Orbax source): the model reads `ttm_jax.config.in_channels(config)`
    channels and predicts `latent_channels` ones (`registry.model_config`: a `DiTConfig`, a `UNetConfig`)."""
    lat = int(config.autoencoder.latent_channels)
    return registry.model_config(config), config_lib.in_channels(config), lat, lat, int(config.stage)
