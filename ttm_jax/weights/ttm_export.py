"""The TTM export format shared by every backbone (`ttm_jax/convert/export.py` writes and reads it through the
backbone's entry; each family's `export.py` fills in its backbone).

An exported folder: the backbone in its source framework's own layout (`config.json` +
`diffusion_pytorch_model.safetensors`, loadable by diffusers as it is), the added layers in `ttm_layers.safetensors`
(absent when ttm_layers = 0) and `ttm_config.json` (`format`, the TTM fields, channels, stage, ...). Every added
layer is an affine LayerNorm `norm` + a Wan-style attention `attn` (`layer_rules`), whatever the backbone.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ttm_jax import cli
from ttm_jax.models import ttm_layers
from ttm_jax.weights import rulebook as rb
from ttm_jax.weights import safetensors_io

TTM_CONFIG_FILE = "ttm_config.json"
TTM_WEIGHTS_FILE = "ttm_layers.safetensors"
FORMAT = "ttm-jax-export/1"
TTM_MODULES = ttm_layers.TTM_MODULES


def layer_rules(t: str, f: str, **kw: Any) -> list[rb.Rule]:
    """One added layer: affine LayerNorm `norm` + Wan attention `attn` (q/k/v/out, RMS-normed q/k)."""
    rules = [rb.Rule(f"{t}.norm.weight", f"{f}/norm/scale", **kw), rb.Rule(f"{t}.norm.bias", f"{f}/norm/bias", **kw),
             rb.Rule(f"{t}.attn.norm_q.weight", f"{f}/attn/norm_q/scale", **kw),
             rb.Rule(f"{t}.attn.norm_k.weight", f"{f}/attn/norm_k/scale", **kw)]
    for tp, fp in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
        rules += [rb.Rule(f"{t}.attn.{tp}.weight", f"{f}/attn/{fp}/kernel", rb.LINEAR, **kw),
                  rb.Rule(f"{t}.attn.{tp}.bias", f"{f}/attn/{fp}/bias", **kw)]
    return rules


def is_ttm_path(path: str) -> bool:
    """True for a `/`-joined Flax path inside an added layer."""
    return any(m in path.split("/") for m in TTM_MODULES)


def write_ttm_config(out_dir: str, meta: dict[str, Any]) -> str:
    """`ttm_config.json` (with `format`) into `out_dir`; returns its path."""
    path = os.path.join(out_dir, TTM_CONFIG_FILE)
    with open(path, "w") as fh:
        json.dump({"format": FORMAT, **meta}, fh, indent=2)
    return path


def read_ttm_config(folder: str, in_channels: int, defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` updated with the folder's `ttm_config.json` (none: `defaults`), whose `in_channels` must agree with
    the backbone's `config.json` (`in_channels`)."""
    meta = dict(defaults)
    file = os.path.join(folder, TTM_CONFIG_FILE)
    if os.path.exists(file):
        with open(file) as fh:
            meta.update(json.load(fh))
        if meta.get("in_channels") is not None and int(meta["in_channels"]) != in_channels:
            raise cli.BadInput(f"{file}: in_channels={meta['in_channels']} but {folder}/config.json has "
                               f"{in_channels}; re-export the folder (python -m ttm_jax.convert export)")
    return meta


def weight_files(folder: str, backbone_file: str, ttm_layers: int) -> list[str]:
    """The folder's safetensors files: the backbone's, and the added layers' when `ttm_layers`; each must exist."""
    files = [os.path.join(folder, backbone_file)]
    if ttm_layers:
        files.append(os.path.join(folder, TTM_WEIGHTS_FILE))
    for f in files:
        if not os.path.exists(f):
            raise cli.MissingInput(f"{f}: missing; {folder}/{TTM_CONFIG_FILE} says ttm_layers={ttm_layers}. "
                                   f"Re-export the folder (python -m ttm_jax.convert export)")
    return files


def write_ttm_weights(out_dir: str, book: rb.RuleBook, added: dict[str, Any], dtype: Any = None) -> str | None:
    """The added layers' flat params `added` -> `ttm_layers.safetensors` through `book` (streamed; `dtype` casts,
    None keeps theirs); with none, an old file is removed (a re-export without TTM layers must not leave one behind)
    and None returned."""
    path = os.path.join(out_dir, TTM_WEIGHTS_FILE)
    if not added:
        if os.path.exists(path):
            os.remove(path)
        return None
    write_part(path, book, added, dtype)
    return path


def write_part(path: str, book: rb.RuleBook, part: dict[str, Any], dtype: Any = None) -> None:
    """Flat Flax params `part` -> one safetensors file through `book`, tensor by tensor (`dtype` casts)."""
    moves = book.plan(part, None, "flax -> torch")
    specs = {mv.torch_key: (mv.torch_shape, rb.as_dtype(dtype if dtype is not None else part[mv.flax_path].dtype))
             for mv in moves}
    tensors = book.iter_torch(rb.unflatten(part))
    if dtype is not None:
        tensors = ((k, v.astype(rb.as_dtype(dtype))) for k, v in tensors)
    safetensors_io.write_safetensors(path, specs, tensors, metadata={"format": "pt"})
