"""diffusers `WanTransformer3DModel` (Wan 2.1 T2V) <-> `ttm_jax.backbones.wan.model.DiT` backbone params: one rulebook.

The rulebook covers the backbone, i.e. a `DiT` with `ttm_layers=0` and the checkpoint's own `in_channels`, in
either layout: `scan_layers=True` (one `blocks` stack, torch `blocks.{i}` stacked on axis 0) or `False`
(`blocks_{i}`). A stage model (more input channels, TTM layers) is made from it by `dit.graft_backbone`, which
zero-pads the new input channels and keeps the (zero-output) TTM layers of a fresh init; `python -m ttm_jax.convert`
does both and writes the Orbax params checkpoint that `config.train.init_from` reads.

Reading streams the safetensors shards tensor by tensor (`safetensors_io.PreadReader`: no memory map, so the peak is
the Flax params plus one tensor); writing streams one safetensors file tensor by tensor.

A converted checkpoint (`save_converted`) is an Orbax params checkpoint `<dir>/params` with `<dir>/ttm_convert.json`
beside it (the source, the `DiTConfig`, the channels): what `config.train.init_from` and the export read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from ttm_jax import cli
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"
CONVERTED_META_FILE = "ttm_convert.json"  # beside a converted Orbax params checkpoint


def _linear(t: str, f: str, **kw: Any) -> list[rb.Rule]:
    return [rb.Rule(f"{t}.weight", f"{f}/kernel", rb.LINEAR, **kw), rb.Rule(f"{t}.bias", f"{f}/bias", **kw)]


def _block(t: str, f: str, **kw: Any) -> list[rb.Rule]:
    rules = [rb.Rule(f"{t}.scale_shift_table", f"{f}/scale_shift_table", **kw),
             rb.Rule(f"{t}.norm2.weight", f"{f}/norm2/scale", **kw),
             rb.Rule(f"{t}.norm2.bias", f"{f}/norm2/bias", **kw)]
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            rules += _linear(f"{t}.{attn}.{proj}", f"{f}/{attn}/{proj}", **kw)
        rules += _linear(f"{t}.{attn}.to_out.0", f"{f}/{attn}/to_out", **kw)
        rules += [rb.Rule(f"{t}.{attn}.norm_q.weight", f"{f}/{attn}/norm_q/scale", **kw),
                  rb.Rule(f"{t}.{attn}.norm_k.weight", f"{f}/{attn}/norm_k/scale", **kw)]
    rules += _linear(f"{t}.ffn.net.0.proj", f"{f}/ffn/proj_in", **kw)
    rules += _linear(f"{t}.ffn.net.2", f"{f}/ffn/proj_out", **kw)
    return rules


def rulebook(scan_layers: bool) -> rb.RuleBook:
    """The backbone rulebook for the `scan_layers` layout."""
    rules: list[Any] = [
        rb.Rule("patch_embedding.weight", "patch_embedding/kernel", rb.CONV3D),
        rb.Rule("patch_embedding.bias", "patch_embedding/bias"),
        rb.Rule("scale_shift_table", "scale_shift_table"),
        *_linear("proj_out", "proj_out"),
        # diffusers recomputes the RoPE tables; they are buffers, not weights
        rb.Ignore("rope.freqs_cos", "recomputed"), rb.Ignore("rope.freqs_sin", "recomputed"),
    ]
    for name in ("time_embedder.linear_1", "time_embedder.linear_2", "time_proj", "text_embedder.linear_1",
                 "text_embedder.linear_2"):
        rules += _linear(f"condition_embedder.{name}", "condition_embedder/" + name.replace(".", "/"))
    if scan_layers:
        rules += _block("blocks.{i}", "blocks", stack="i")
    else:
        rules += _block("blocks.{i}", "blocks_{i}")
    return rb.RuleBook(f"wan_dit(scan_layers={scan_layers})", rules)


def config_from_diffusers(cfg: Mapping[str, Any], *, scan_layers: bool = True, source: str = CONFIG_FILE,
                          **overrides: Any) -> tuple[dit_lib.DiTConfig, int, int]:
    """(`DiTConfig` with `ttm_layers=0`, in_channels, out_channels) of a `WanTransformer3DModel` config dict."""
    if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
        raise cli.BadInput(f"{source}: image_dim / added_kv_proj_dim are set (an I2V checkpoint with an image "
                         "encoder branch); TTM fine-tunes the T2V model (e.g. Wan2.1-T2V-1.3B-Diffusers/transformer)")
    if cfg.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads",):
        raise cli.BadInput(f"{source}: qk_norm={cfg.get('qk_norm')!r}; the DiT implements rms_norm_across_heads")
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    kw = dict(dim=heads * head_dim, num_layers=int(cfg["num_layers"]), num_heads=heads, ffn_dim=int(cfg["ffn_dim"]),
              text_dim=int(cfg["text_dim"]), freq_dim=int(cfg["freq_dim"]), ttm_layers=0,
              patch_size=tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2))),
              rope_max_seq_len=int(cfg.get("rope_max_seq_len", 1024)), eps=float(cfg.get("eps", 1e-6)),
              qk_norm=True, cross_attn_norm=bool(cfg.get("cross_attn_norm", True)), scan_layers=scan_layers)
    kw.update(overrides)
    return dit_lib.DiTConfig(**kw), int(cfg.get("in_channels", 16)), int(cfg.get("out_channels", 16))


def read_config(path: str, **kw: Any) -> tuple[dit_lib.DiTConfig, int, int]:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(file):
        raise cli.MissingInput(f"{file}: not found; the source (--from=diffusers:PATH) must be a diffusers "
                               "WanTransformer3DModel folder (config.json + safetensors), e.g. "
                               "Wan2.1-T2V-1.3B-Diffusers/transformer")
    with open(file) as f:
        return config_from_diffusers(json.load(f), source=file, **kw)


def template(cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int) -> Any:
    """The DiT's unboxed parameter tree as `jax.ShapeDtypeStruct`s (no memory spent)."""
    model = dit_lib.DiT(cfg, in_channels, out_channels)
    args, kwargs = dit_lib.init_inputs(cfg, in_channels)
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs)["params"]))


def _check_backbone(cfg: dit_lib.DiTConfig) -> None:
    if cfg.ttm_layers:
        raise ValueError("ttm_jax/backbones/wan/weights.py: the rulebook maps the backbone (ttm_layers=0), got "
                         f"ttm_layers={cfg.ttm_layers}; convert the backbone, then dit.graft_backbone into the stage "
                         "model")


def torch_to_flax(tensors: Mapping[str, Any], cfg: dit_lib.DiTConfig, in_channels: int,
                  out_channels: int) -> dict[str, Any]:
    """{torch key: array or tensor} -> unboxed backbone params (numpy, the template's dtypes)."""
    _check_backbone(cfg)
    arrays = {k: rb.as_numpy(v) for k, v in tensors.items()}
    return rulebook(cfg.scan_layers).to_flax(arrays, template(cfg, in_channels, out_channels))


def flax_to_torch(params: Mapping[str, Any], cfg: dit_lib.DiTConfig,
                  torch_specs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Unboxed backbone params -> {torch key: numpy array}."""
    _check_backbone(cfg)
    return rulebook(cfg.scan_layers).to_torch(params, torch_specs)


def load_diffusers_folder(path: str, *, scan_layers: bool = True,
                          param_dtype: str = "float32") -> tuple[dit_lib.DiTConfig, int, int, dict[str, Any]]:
    """(config, in_channels, out_channels, unboxed params) from a diffusers transformer folder (sharded or not),
    streamed tensor by tensor; bfloat16 checkpoints are cast to `param_dtype` on the way."""
    cfg, cin, cout = read_config(path, scan_layers=scan_layers, param_dtype=param_dtype)
    reader = safetensors_io.PreadReader(path)
    params = rb.stream_to_flax(rulebook(scan_layers), reader, template(cfg, cin, cout))
    return cfg, cin, cout, params


def diffusers_config(cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int) -> dict[str, Any]:
    """The `WanTransformer3DModel` config dict of a backbone `cfg`."""
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim, "in_channels": in_channels,
            "out_channels": out_channels, "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
            "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": cfg.rope_max_seq_len}


def save_diffusers_folder(params: Mapping[str, Any], cfg: dit_lib.DiTConfig, in_channels: int, out_channels: int,
                          out_dir: str, dtype: Any = None) -> str:
    """Writes `out_dir/config.json` + one streamed safetensors file (loadable by
    `WanTransformer3DModel.from_pretrained`). Returns the weights path."""
    _check_backbone(cfg)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(diffusers_config(cfg, in_channels, out_channels), f, indent=2)
    book = rulebook(cfg.scan_layers)
    flat = rb.flatten(params)
    specs = {mv.torch_key: (mv.torch_shape, rb.as_dtype(dtype if dtype is not None else flat[mv.flax_path].dtype))
             for mv in book.plan(flat, None, "flax -> torch")}
    file = os.path.join(out_dir, WEIGHTS_FILE)
    safetensors_io.write_safetensors(file, specs, book.iter_torch(params), metadata={"format": "pt"})
    return file


def save_converted(target: str, params: Any, cfg: Any, in_channels: int, out_channels: int, source: str, *,
                   backbone: str = "dit") -> str:
    """Writes a converted checkpoint: the (unboxed) `params` as an Orbax params checkpoint at `target`, and
    `ttm_convert.json` beside it ({source, backbone, model: `cfg` (the backbone's frozen config dataclass: a
    `DiTConfig`, or the U-Net's `UNetConfig` with `backbone="unet"`) as a dict, in_channels, out_channels, params:
    the absolute `target`}), which `read_converted` / `read_converted_meta` read back. Returns the absolute
    `target`."""
    target = os.path.abspath(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, params)
        ckptr.wait_until_finished()
    meta = {"source": os.path.abspath(source), "backbone": backbone, "model": dataclasses.asdict(cfg),
            "in_channels": in_channels, "out_channels": out_channels, "params": target}
    with open(os.path.join(os.path.dirname(target), CONVERTED_META_FILE), "w") as fh:
        json.dump(meta, fh, indent=2)
    return target


def converted_meta_file(params_path: str) -> str:
    """The `ttm_convert.json` that `save_converted` writes beside the Orbax params checkpoint `params_path`."""
    return os.path.join(os.path.dirname(os.path.abspath(params_path)), CONVERTED_META_FILE)


def read_converted_meta(params_path: str) -> dict[str, Any]:
    """The `ttm_convert.json` beside the converted checkpoint `params_path` as a dict (`backbone` "dit" when the
    file predates the field; FileNotFoundError when there is none)."""
    with open(converted_meta_file(params_path)) as fh:
        meta = json.load(fh)
    meta.setdefault("backbone", "dit")
    return meta


def read_converted(params_path: str) -> tuple[dit_lib.DiTConfig, int, int]:
    """(`DiTConfig`, in_channels, out_channels) of the converted DiT checkpoint `params_path` from the
    `ttm_convert.json` beside it (`converted_meta_file`; FileNotFoundError when there is none; a U-Net's is read by
    `convert/export.py: converted_dims`)."""
    meta = read_converted_meta(params_path)
    if meta["backbone"] != "dit":
        raise cli.BadInput(f"{converted_meta_file(params_path)}: backbone {meta['backbone']!r}, not a DiT; read it "
                           f"with ttm_jax/convert/export.py: converted_dims")
    return dit_lib.DiTConfig.from_config(meta["model"]), int(meta["in_channels"]), int(meta["out_channels"])
