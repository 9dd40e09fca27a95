"""diffusers `UNetMotionModel` (SD 1.5 U-Net + AnimateDiff motion adapter) <->
`ttm_jax.backbones.animatediff.model.UNet` params.

One rulebook, both ways: a diffusers state dict (numpy arrays or torch tensors) -> the U-Net backbone's params
(`torch_to_flax`), and back (`flax_to_torch`), bit for bit. The motion modules' `pos_embed.pe` buffers are not
parameters (the Flax model recomputes the table, `unet.sinusoid_table`); on import their shapes are checked against
`motion_max_seq_length`, on export they are rebuilt with diffusers' own float32 recipe (`position_table`, in torch
when it is installed, so a round trip gives the very same tensors).

TTM's added layers (`masked_self_attn` / `masked_cross_attn`) have no diffusers counterpart: they are `FlaxOnly`
(torch -> flax keeps the template's zero-output initial values; flax -> torch drops them).

A diffusers AnimateDiff checkpoint is either a saved `UNetMotionModel` folder, or SD 1.5's `unet/` folder plus a
`MotionAdapter` folder (`guoyww/animatediff-motion-adapter-v1-5-3`): their keys are disjoint and together are exactly
a `UNetMotionModel`'s (`load_diffusers_folders` reads both, streamed tensor by tensor). `save_diffusers_folder`
writes a `UNetMotionModel` folder back (config.json + one streamed safetensors file).

    cfg, cin, cout, params = load_diffusers_folders("sd15/unet", "animatediff-motion-adapter-v1-5-3")
    stage = unet.graft_backbone(fresh_stage_params, params)   # TTM layers + 3x input channels, zero at step 0
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ttm_jax import cli
from ttm_jax.backbones.animatediff import model as unet_lib
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PE_SUFFIX = ".pos_embed.pe"


def _linear(t: str, f: str, bias: bool = True) -> list[rb.Rule]:
    rules = [rb.Rule(f"{t}.weight", f"{f}/kernel", rb.LINEAR)]
    return rules + [rb.Rule(f"{t}.bias", f"{f}/bias")] if bias else rules


def _conv(t: str, f: str) -> list[rb.Rule]:
    return [rb.Rule(f"{t}.weight", f"{f}/kernel", rb.CONV2D), rb.Rule(f"{t}.bias", f"{f}/bias")]


def _norm(t: str, f: str) -> list[rb.Rule]:
    return [rb.Rule(f"{t}.weight", f"{f}/scale"), rb.Rule(f"{t}.bias", f"{f}/bias")]


def _resnet(t: str, f: str) -> list[rb.Rule]:
    return (_norm(f"{t}.norm1", f"{f}/norm1") + _conv(f"{t}.conv1", f"{f}/conv1")
            + _linear(f"{t}.time_emb_proj", f"{f}/time_emb_proj") + _norm(f"{t}.norm2", f"{f}/norm2")
            + _conv(f"{t}.conv2", f"{f}/conv2") + _conv(f"{t}.conv_shortcut", f"{f}/conv_shortcut"))


def _block(t: str, f: str) -> list[rb.Rule]:
    t, f = f"{t}.transformer_blocks.{{k}}", f"{f}/transformer_blocks_{{k}}"
    rules = []
    for n in ("norm1", "norm2", "norm3"):
        rules += _norm(f"{t}.{n}", f"{f}/{n}")
    for a in ("attn1", "attn2"):
        for p in ("to_q", "to_k", "to_v"):
            rules += _linear(f"{t}.{a}.{p}", f"{f}/{a}/{p}", bias=False)
        rules += _linear(f"{t}.{a}.to_out.0", f"{f}/{a}/to_out")
    return rules + _linear(f"{t}.ff.net.0.proj", f"{f}/ff/proj_in") + _linear(f"{t}.ff.net.2", f"{f}/ff/proj_out")


def _spatial(t: str, f: str, linear: bool) -> list[rb.Rule]:
    proj = _linear if linear else _conv
    return (_norm(f"{t}.norm", f"{f}/norm") + proj(f"{t}.proj_in", f"{f}/proj_in") + _block(t, f)
            + proj(f"{t}.proj_out", f"{f}/proj_out"))


def _motion(t: str, f: str) -> list[Any]:
    return (_norm(f"{t}.norm", f"{f}/norm") + _linear(f"{t}.proj_in", f"{f}/proj_in") + _block(t, f)
            + _linear(f"{t}.proj_out", f"{f}/proj_out")
            + [rb.Ignore(t.replace("{i}", "*").replace("{j}", "*") + ".transformer_blocks.*" + PE_SUFFIX,
                         "the frame embedding table, recomputed")])


def rulebook(cfg: unet_lib.UNetConfig) -> rb.RuleBook:
    """The `UNetMotionModel` <-> `UNet` rulebook (`cfg.use_linear_projection` picks the spatial projections' form)."""
    lin = cfg.use_linear_projection
    rules: list[Any] = [*_conv("conv_in", "conv_in"), *_conv("conv_out", "conv_out"),
                        *_norm("conv_norm_out", "conv_norm_out"),
                        *_linear("time_embedding.linear_1", "time_embedding/linear_1"),
                        *_linear("time_embedding.linear_2", "time_embedding/linear_2"),
                        rb.FlaxOnly("*/masked_self_attn/*", "TTM's added layer (no diffusers counterpart)"),
                        rb.FlaxOnly("*/masked_cross_attn/*", "TTM's added layer (no diffusers counterpart)")]
    for part in ("down_blocks", "up_blocks"):
        t, f = f"{part}.{{i}}", f"{part}_{{i}}"
        rules += _resnet(f"{t}.resnets.{{j}}", f"{f}_resnets_{{j}}")
        rules += _spatial(f"{t}.attentions.{{j}}", f"{f}_attentions_{{j}}", lin)
        rules += _motion(f"{t}.motion_modules.{{j}}", f"{f}_motion_modules_{{j}}")
    rules += _conv("down_blocks.{i}.downsamplers.0.conv", "down_blocks_{i}_downsamplers_0_conv")
    rules += _conv("up_blocks.{i}.upsamplers.0.conv", "up_blocks_{i}_upsamplers_0_conv")
    rules += _resnet("mid_block.resnets.{j}", "mid_block_resnets_{j}")
    rules += _spatial("mid_block.attentions.{j}", "mid_block_attentions_{j}", lin)
    rules += _motion("mid_block.motion_modules.{j}", "mid_block_motion_modules_{j}")
    return rb.RuleBook(f"unet_motion(linear_projection={lin})", rules)


# ---------------------------------------------------------------------------------------------------------------------
# Config


_SUPPORTED_DEFAULTS = {
    # UNetMotionModel fields
    "act_fn": "silu", "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
    "time_cond_proj_dim": None, "reverse_transformer_layers_per_block": None,
    "reverse_temporal_transformer_layers_per_block": None, "reverse_motion_num_attention_heads": None,
    # SD 1.5 UNet2DConditionModel fields (the unet/ folder of the two-folder form)
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "time_embedding_type": "positional",
    "class_embed_type": None, "num_class_embeds": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None, "timestep_post_act": None, "dual_cross_attention": False,
    "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
}


def config_from_diffusers(cfg: Mapping[str, Any], *, source: str = CONFIG_FILE,
                          **overrides: Any) -> tuple[unet_lib.UNetConfig, int, int]:
    """(`UNetConfig` with `ttm_layers=0`, in_channels, out_channels) of a `UNetMotionModel` config dict; raises
    naming `source` and the field for what the Flax U-Net does not implement."""
    for key, want in _SUPPORTED_DEFAULTS.items():
        value = cfg.get(key, want)
        if isinstance(value, list | tuple) and all(v == want for v in value):  # per-level lists
            continue
        if value != want:
            raise cli.BadInput(f"{source}: {key}={cfg[key]!r} is not implemented by "
                               "ttm_jax/backbones/animatediff/model.py "
                             f"(it supports {want!r}: SD 1.5 + AnimateDiff)")
    ints = {}
    for key in ("layers_per_block", "transformer_layers_per_block", "temporal_transformer_layers_per_block"):
        v = cfg.get(key, 1 if key != "layers_per_block" else 2)
        if not isinstance(v, int):
            if len(set(v)) != 1:
                raise cli.BadInput(f"{source}: {key}={v!r} varies per level; ttm_jax/backbones/animatediff/model.py "
                                   "takes one value")
            v = v[0]
        ints[key] = int(v)
    mid_layers = cfg.get("transformer_layers_per_mid_block")
    if mid_layers is not None and int(mid_layers) != ints["transformer_layers_per_block"]:
        raise cli.BadInput(f"{source}: transformer_layers_per_mid_block={mid_layers} differs from "
                         f"transformer_layers_per_block; ttm_jax/backbones/animatediff/model.py uses one value")
    cad = cfg.get("cross_attention_dim", 1280)
    if not isinstance(cad, int):
        if len(set(cad)) != 1:
            raise cli.BadInput(f"{source}: cross_attention_dim={cad!r} varies per level; one text width is supported")
        cad = cad[0]
    heads = cfg.get("num_attention_heads", 8)
    mheads = cfg.get("motion_num_attention_heads", 8)
    kw = dict(block_out_channels=tuple(int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280))),
              down_block_types=tuple(cfg["down_block_types"]) if "down_block_types" in cfg
              else unet_lib.UNetConfig.down_block_types,
              up_block_types=tuple(cfg["up_block_types"]) if "up_block_types" in cfg
              else unet_lib.UNetConfig.up_block_types,
              layers_per_block=ints["layers_per_block"],
              num_attention_heads=heads if isinstance(heads, int) else tuple(heads),
              cross_attention_dim=int(cad), norm_num_groups=int(cfg.get("norm_num_groups", 32)),
              norm_eps=float(cfg.get("norm_eps", 1e-5)),
              transformer_layers_per_block=ints["transformer_layers_per_block"],
              use_linear_projection=bool(cfg.get("use_linear_projection", False)),
              mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1.0)),
              mid_block_layers=int(cfg.get("mid_block_layers", 1)),
              use_motion_mid_block=bool(cfg.get("use_motion_mid_block", True)),
              motion_num_attention_heads=mheads if isinstance(mheads, int) else tuple(mheads),
              motion_max_seq_length=int(cfg.get("motion_max_seq_length", 32)),
              temporal_transformer_layers_per_block=ints["temporal_transformer_layers_per_block"],
              temporal_transformer_layers_per_mid_block=int(cfg.get("temporal_transformer_layers_per_mid_block")
                                                            or 1),
              ttm_layers=0)
    kw.update(overrides)
    return unet_lib.UNetConfig(**kw), int(cfg.get("in_channels", 4)), int(cfg.get("out_channels", 4))


def diffusers_config(cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int) -> dict[str, Any]:
    """The `UNetMotionModel` config dict of `cfg` (what `UNetMotionModel.from_config` takes)."""
    heads = cfg.num_attention_heads
    mheads = cfg.motion_num_attention_heads
    return {"_class_name": "UNetMotionModel", "in_channels": in_channels, "out_channels": out_channels,
            "block_out_channels": list(cfg.block_out_channels), "down_block_types": list(cfg.down_block_types),
            "up_block_types": list(cfg.up_block_types), "layers_per_block": cfg.layers_per_block,
            "num_attention_heads": heads if isinstance(heads, int) else list(heads),
            "cross_attention_dim": cfg.cross_attention_dim, "norm_num_groups": cfg.norm_num_groups,
            "norm_eps": cfg.norm_eps, "transformer_layers_per_block": cfg.transformer_layers_per_block,
            "use_linear_projection": cfg.use_linear_projection, "mid_block_scale_factor": cfg.mid_block_scale_factor,
            "mid_block_layers": cfg.mid_block_layers, "use_motion_mid_block": cfg.use_motion_mid_block,
            "motion_num_attention_heads": mheads if isinstance(mheads, int) else list(mheads),
            "motion_max_seq_length": cfg.motion_max_seq_length,
            "temporal_transformer_layers_per_block": cfg.temporal_transformer_layers_per_block,
            "temporal_transformer_layers_per_mid_block": cfg.temporal_transformer_layers_per_mid_block,
            "act_fn": "silu", "downsample_padding": 1}


def read_config(path: str, **kw: Any) -> tuple[unet_lib.UNetConfig, int, int]:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise cli.MissingInput(f"{file}: not found; pass a diffusers UNetMotionModel folder (config.json + "
                                f"safetensors), or SD 1.5's unet/ folder with a MotionAdapter folder")
    with open(file) as f:
        return config_from_diffusers(json.load(f), source=file, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# Conversion


def template(cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int, *, values: bool = False) -> Any:
    """The U-Net's unboxed parameter tree: `jax.ShapeDtypeStruct`s, or (`values`, needed when there are TTM layers,
    whose initial values conversion keeps) a real init with seed 0."""
    model = unet_lib.UNet(cfg, in_channels, out_channels)
    args, kwargs = unet_lib.init_inputs(cfg, in_channels)
    init = lambda: model.init(jax.random.key(0), *args, **kwargs)["params"]  # noqa: E731
    tree = init() if values else jax.eval_shape(init)
    return rb.unflatten(rb.flatten(tree))  # flatten unboxes the logical-partitioning metadata


def _check_positions(tensors: Mapping[str, Any], cfg: unet_lib.UNetConfig) -> None:
    bad = []
    for key in tensors:
        if key.endswith(PE_SUFFIX):
            shape = rb.spec_of(tensors[key])[0]
            if len(shape) != 3 or shape[1] != cfg.motion_max_seq_length:
                bad.append(f"{key!r} {shape}")
    if bad:
        raise rb.ConversionError(f"ttm_jax/backbones/animatediff/weights.py: frame embedding buffers {bad[:3]} do "
                                 "not have "
                                 f"motion_max_seq_length={cfg.motion_max_seq_length} rows; set "
                                 f"config.model.motion_max_seq_length to the checkpoint's (its config.json)")


def torch_to_flax(tensors: Mapping[str, Any], cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int,
                  template_params: Any = None) -> dict[str, Any]:
    """{torch key: array or tensor} of a `UNetMotionModel` -> unboxed `UNet(cfg)` params (numpy). With TTM layers
    pass `template_params` (a fresh init, whose TTM values are kept), else one is made."""
    _check_positions(tensors, cfg)
    if template_params is None:
        template_params = template(cfg, in_channels, out_channels, values=cfg.ttm_layers > 0)
    arrays = {k: rb.as_numpy(v) for k, v in tensors.items()}
    return rulebook(cfg).to_flax(arrays, template_params)


def position_table(dim: int, length: int) -> np.ndarray:
    """diffusers' `SinusoidalPositionalEmbedding.pe` float32 `[1, length, dim]` by its own float32 recipe (in torch
    when installed, so the bits match a checkpoint diffusers made on the CPU; numpy otherwise, equal to ~1e-6)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is installed wherever the exporter runs
        pos = np.arange(length, dtype=np.float32)[:, None]
        div = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
        pe = np.zeros((1, length, dim), np.float32)
        pe[0, :, 0::2], pe[0, :, 1::2] = np.sin(pos * div), np.cos(pos * div)
        return pe
    pos = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe.numpy()


_MOTION_BLOCK = re.compile(r"^(?:(down_blocks|up_blocks)_(\d+)|(mid_block))_motion_modules_(\d+)/"
                           r"transformer_blocks_(\d+)/norm1/scale$")


def position_buffers(params: Mapping[str, Any], cfg: unet_lib.UNetConfig) -> dict[str, np.ndarray]:
    """{`...motion_modules.j.transformer_blocks.k.pos_embed.pe`: `[1, motion_max_seq_length, C]`} for every temporal
    block in `params`."""
    out = {}
    for path, value in rb.flatten(params).items():
        m = _MOTION_BLOCK.match(path)
        if m:
            part = f"{m[1]}.{m[2]}" if m[1] else m[3]
            key = f"{part}.motion_modules.{m[4]}.transformer_blocks.{m[5]}{PE_SUFFIX}"
            out[key] = position_table(int(np.shape(value)[0]), cfg.motion_max_seq_length)
    return out


def flax_to_torch(params: Mapping[str, Any], cfg: unet_lib.UNetConfig,
                  torch_specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Unboxed `UNet(cfg)` params -> a `UNetMotionModel` state dict of numpy arrays, the `pos_embed.pe` buffers
    included (TTM layers dropped). With `torch_specs` (the target's state dict) every key, shape and dtype is
    checked."""
    pes = position_buffers(params, cfg)
    specs = None if torch_specs is None else {k: v for k, v in torch_specs.items() if not k.endswith(PE_SUFFIX)}
    out = rulebook(cfg).to_torch(params, specs)
    if torch_specs is not None:
        missing = sorted(k for k in torch_specs if k.endswith(PE_SUFFIX) and k not in pes)
        if missing:
            raise rb.ConversionError("ttm_jax/backbones/animatediff/weights.py: the target has frame embedding "
                                     f"buffers {missing[:3]} for "
                                     f"motion modules the params lack; was it built with the same config?")
    out.update(pes)
    return out


def load_diffusers_folders(*paths: str, param_dtype: str = "float32",
                           **overrides: Any) -> tuple[unet_lib.UNetConfig, int, int, dict[str, Any]]:
    """(config, in_channels, out_channels, unboxed params) from a `UNetMotionModel` folder, or SD 1.5's `unet/`
    folder followed by a `MotionAdapter` folder (config read from the first path; the adapter's
    `use_motion_mid_block` and `motion_*` fields from its own config.json), streamed tensor by tensor. The params are
    the backbone's (`ttm_layers=0`); `unet.graft_backbone` puts them into a model with TTM layers."""
    if not paths:
        raise ValueError("ttm_jax/backbones/animatediff/weights.py: load_diffusers_folders needs at least one folder")
    with open(os.path.join(paths[0], CONFIG_FILE)) as f:
        raw = dict(json.load(f))
    for extra in paths[1:]:
        with open(os.path.join(extra, CONFIG_FILE)) as f:
            adapter = json.load(f)
        for src, dst in (("motion_num_attention_heads", "motion_num_attention_heads"),
                         ("motion_max_seq_length", "motion_max_seq_length"),
                         ("use_motion_mid_block", "use_motion_mid_block"),
                         ("motion_transformer_layers_per_block", "temporal_transformer_layers_per_block"),
                         ("motion_transformer_layers_per_mid_block", "temporal_transformer_layers_per_mid_block")):
            if src in adapter:
                raw[dst] = adapter[src]
        raw["down_block_types"] = [t.replace("CrossAttnDownBlock2D", unet_lib.CROSS_DOWN)
                                   .replace("DownBlock2D", unet_lib.PLAIN_DOWN) for t in raw["down_block_types"]]
        raw["up_block_types"] = [t.replace("CrossAttnUpBlock2D", unet_lib.CROSS_UP)
                                 .replace("UpBlock2D", unet_lib.PLAIN_UP) for t in raw["up_block_types"]]
        if raw.get("num_attention_heads") is None and "attention_head_dim" in raw:
            raw["num_attention_heads"] = raw["attention_head_dim"]  # SD 1.5's config names the head count so
    cfg, cin, cout = config_from_diffusers(raw, source=os.path.join(paths[0], CONFIG_FILE), ttm_layers=0,
                                           param_dtype=param_dtype, **overrides)
    readers = [safetensors_io.PreadReader(p) for p in paths]
    specs: dict[str, Any] = {}
    owner: dict[str, Any] = {}
    for reader, p in zip(readers, paths, strict=True):
        for k, spec in reader.specs.items():
            if k in specs:
                raise rb.ConversionError(f"ttm_jax/backbones/animatediff/weights.py: {k!r} is in both {paths[0]} "
                                         f"and {p}; pass the U-Net "
                                         f"folder and the MotionAdapter folder, not two copies")
            specs[k], owner[k] = spec, reader
    _check_positions({k: s[0] for k, s in specs.items()}, cfg)

    class _Joined(Mapping):
        def __getitem__(self, key):
            return owner[key][key]

        def __iter__(self):
            return iter(specs)

        def __len__(self):
            return len(specs)

    return cfg, cin, cout, rb.stream_to_flax(rulebook(cfg), _Joined(), template(cfg, cin, cout), specs)


def save_diffusers_folder(params: Mapping[str, Any], cfg: unet_lib.UNetConfig, in_channels: int, out_channels: int,
                          out_dir: str, dtype: Any = None) -> str:
    """Writes `out_dir/config.json` (`diffusers_config`) + one streamed `diffusion_pytorch_model.safetensors` with
    every tensor of the backbone (frame-embedding buffers included, TTM layers dropped), which
    `UNetMotionModel.from_config(...)` + `load_state_dict(strict=True)` (or `from_pretrained`) loads. `dtype`: the
    file's float dtype (default the params'). Returns the weights path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(diffusers_config(cfg, in_channels, out_channels), f, indent=2)
    book = rulebook(cfg)
    flat = rb.flatten(params)
    specs = {mv.torch_key: (mv.torch_shape, rb.as_dtype(dtype if dtype is not None else flat[mv.flax_path].dtype))
             for mv in book.plan(flat, None, "flax -> torch")}
    pes = position_buffers(params, cfg)
    specs.update({k: (v.shape, np.float32) for k, v in pes.items()})
    file = os.path.join(out_dir, WEIGHTS_FILE)
    tensors = itertools.chain(book.iter_torch(params), pes.items())
    safetensors_io.write_safetensors(file, specs, tensors, metadata={"format": "pt"})
    return file
