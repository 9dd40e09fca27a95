"""The AnimateDiff U-Net's config-level part (`config.model.backbone = "unet"`): its block kinds, `section(...)` (the
`config.model.unet` sub-section of a U-Net variant, `ttm_jax/config/variants.py`), `UNET_STATE_KEYS`, and `check`,
its fields' checks, and `grid_step`, its latent grid's granularity, which `ttm_jax/config/` calls by
`model.backbone` (`config/families.py`). Layer 0: imports only `ttm_jax.cli`."""

from __future__ import annotations

from typing import Any

import ml_collections

from ttm_jax.cli import ConfigError
from ttm_jax.cli import check_config as _check

UNET_CROSS_DOWN, UNET_PLAIN_DOWN = "CrossAttnDownBlockMotion", "DownBlockMotion"
UNET_CROSS_UP, UNET_PLAIN_UP = "CrossAttnUpBlockMotion", "UpBlockMotion"
# `config.model.unet` keys that fix the U-Net's parameter shapes (a resume must keep them; `entry.py`'s state_fields)
UNET_STATE_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                   "num_attention_heads", "cross_attention_dim", "norm_num_groups", "transformer_layers_per_block",
                   "use_linear_projection", "mid_block_layers", "use_motion_mid_block", "motion_num_attention_heads",
                   "temporal_transformer_layers_per_block", "temporal_transformer_layers_per_mid_block",
                   "ttm_qk_norm")


def section(**overrides: Any) -> dict[str, Any]:
    """`config.model.unet` of a U-Net variant (`backbone="unet"`, `ttm_jax/backbones/animatediff/model.py`): the
    architecture, by default SD 1.5's U-Net + AnimateDiff V3's motion modules (no motion mid block), 1,276,658,564
    parameters as
    diffusers' `UNetMotionModel`. The U-Net's fields live in this sub-section so that DiT variants carry none of them
    (and U-Net variants none of the DiT's `dim`, `num_layers`, ...); the fields shared with the DiT (`ttm_layers`,
    `ttm_masked*`, `attention`, `attention_sparse`, `remat_policy`, `dtype`, `param_dtype`, `cross_ids_from`,
    `condition_frames`) stay in `config.model`."""
    u = {"block_out_channels": (320, 640, 1280, 1280),
         "down_block_types": (UNET_CROSS_DOWN,) * 3 + (UNET_PLAIN_DOWN,),
         "up_block_types": (UNET_PLAIN_UP,) + (UNET_CROSS_UP,) * 3,
         "layers_per_block": 2, "num_attention_heads": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
         "norm_eps": 1e-5, "transformer_layers_per_block": 1, "use_linear_projection": False,
         "mid_block_scale_factor": 1.0, "mid_block_layers": 1, "use_motion_mid_block": False,
         "motion_num_attention_heads": 8, "motion_max_seq_length": 32, "temporal_transformer_layers_per_block": 1,
         "temporal_transformer_layers_per_mid_block": 1,
         # TTM's added layers: masked self-attention over every frame's tokens of an object ("spatio-temporal"),
         # False: within each frame; RMS norms on their q and k
         "ttm_self_across_frames": True, "ttm_qk_norm": True,
         # diffusers folders `python -m ttm_jax.convert --from=diffusers-unet:PATH[,motion_adapter:PATH]` reads
         # (SD 1.5's unet/ + the MotionAdapter, or one UNetMotionModel folder); training starts from the converted
         # checkpoint (`train.init_from`), so these only document where it came from
         "pretrained_unet": "", "pretrained_motion_adapter": ""}
    unknown = set(overrides) - set(u)
    if unknown:
        raise ConfigError(f"config.model.unet: unknown keys {sorted(unknown)}; choose from {sorted(u)}")
    u.update(overrides)
    return u


def _per_level(value: Any, n: int, field: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(value) if isinstance(value, list | tuple) else ()
    _check(len(out) == n and all(isinstance(v, int) for v in out), f"model.unet.{field}",
           f"{value!r} must be an int or one int per level ({n}, as model.unet.block_out_channels)")
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """The U-Net's fields `model.unet` (ttm_jax/backbones/animatediff/model.py), against the text encoder and the
    latent grid."""
    m, t = config.model, config.text_encoder
    _check("unet" in m, "model.unet", "missing; a backbone='unet' config needs the U-Net section (use a U-Net variant "
           "such as configs/stage2.py:tiny_unet, or ttm_jax/backbones/animatediff/config.py: section())")
    u = m.unet
    chans = tuple(u.block_out_channels)
    n = len(chans)
    _check(n >= 1 and all(isinstance(c, int) and c > 0 for c in chans), "model.unet.block_out_channels",
           f"{u.block_out_channels!r} must be positive ints, one per level")
    down, up = tuple(u.down_block_types), tuple(u.up_block_types)
    _check(len(down) == n and all(k in (UNET_CROSS_DOWN, UNET_PLAIN_DOWN) for k in down),
           "model.unet.down_block_types", f"{down!r}: one per level, each {UNET_CROSS_DOWN} or {UNET_PLAIN_DOWN}")
    _check(len(up) == n and all(k in (UNET_CROSS_UP, UNET_PLAIN_UP) for k in up), "model.unet.up_block_types",
           f"{up!r}: one per level, each {UNET_CROSS_UP} or {UNET_PLAIN_UP}")
    for name in ("layers_per_block", "norm_num_groups", "transformer_layers_per_block", "mid_block_layers",
                 "motion_max_seq_length", "temporal_transformer_layers_per_block",
                 "temporal_transformer_layers_per_mid_block", "cross_attention_dim"):
        _check(isinstance(u[name], int) and u[name] > 0, f"model.unet.{name}", f"{u[name]!r} must be a positive int")
    for c in chans:
        _check(c % u.norm_num_groups == 0, "model.unet.norm_num_groups",
               f"{u.norm_num_groups} does not divide block_out_channels entry {c}; pick a divisor")
    for name in ("num_attention_heads", "motion_num_attention_heads"):
        for c, h in zip(chans, _per_level(u[name], n, name), strict=True):
            _check(h > 0 and c % h == 0, f"model.unet.{name}", f"{h} heads do not divide a level's {c} channels")
    encoder_transformers = u.layers_per_block * sum(k == UNET_CROSS_DOWN for k in down)
    _check(0 <= m.ttm_layers <= encoder_transformers, "model.ttm_layers",
           f"{m.ttm_layers} must be in [0, {encoder_transformers}]: the U-Net's encoder spatial transformers "
           f"(model.unet.layers_per_block x the {UNET_CROSS_DOWN} blocks; SD 1.5 has 6)")
    _check(u.cross_attention_dim == t.d_model, "model.unet.cross_attention_dim",
           f"{u.cross_attention_dim} but text_encoder.d_model={t.d_model}; the U-Net cross-attends to the encoder's "
           f"output, set model.unet.cross_attention_dim={t.d_model}")
    a, d = config.autoencoder, config.data
    frames = 1 + (d.num_frames - 1) // max(1, a.time_factor)
    _check(frames <= u.motion_max_seq_length, "model.unet.motion_max_seq_length",
           f"{u.motion_max_seq_length} but the clip has {frames} latent frames (data.num_frames={d.num_frames}); the "
           f"motion modules' frame embedding has that many rows (AnimateDiff: 32): use fewer frames")
    _check(all(isinstance(u[k], bool) for k in ("use_linear_projection", "use_motion_mid_block",
                                                 "ttm_self_across_frames", "ttm_qk_norm")),
           "model.unet.use_linear_projection",
           "use_linear_projection, use_motion_mid_block, ttm_self_across_frames and ttm_qk_norm must be True/False")


def grid_step(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(t, h, w) latent cells the U-Net's grid must be a multiple of: one halving per level but the last,
    `2^(levels-1)` in H and W, none in time. Without a `model.unet` section (which `check` reports) 1."""
    m = config.model
    if "unet" not in m:
        return 1, 1, 1
    s = 2 ** (len(tuple(m.unet.block_out_channels)) - 1)
    return 1, s, s
