"""The Wan DiT's config-level part (`config.model.backbone = "dit"`): `check`, its fields' checks, `grid_step`, its
latent grid's granularity, and `check_context`, its context-parallel path's, which `ttm_jax/config/` calls by
`model.backbone` (`config/families.py`). Layer 0: imports only `ttm_jax.cli`."""

from __future__ import annotations

import ml_collections

from ttm_jax.cli import check_config as _check


def check(config: ml_collections.ConfigDict) -> None:
    """The DiT's fields (ttm_jax/backbones/wan/model.py)."""
    m, t = config.model, config.text_encoder
    for name in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim"):
        _check(isinstance(m[name], int) and m[name] > 0, f"model.{name}", f"{m[name]!r} must be a positive int")
    _check(m.dim % m.num_heads == 0, "model.dim",
           f"{m.dim} is not divisible by model.num_heads={m.num_heads}; pick a dim that is")
    head_dim = m.dim // m.num_heads
    _check(head_dim % 2 == 0 and head_dim >= 6, "model.num_heads",
           f"head dim {head_dim} (dim/num_heads) must be even and >= 6 for 3D RoPE")
    _check(m.freq_dim % 2 == 0, "model.freq_dim", f"{m.freq_dim} must be even (sin and cos halves)")
    _check(0 <= m.ttm_layers <= m.num_layers, "model.ttm_layers",
           f"{m.ttm_layers} must be in [0, model.num_layers={m.num_layers}]")
    _check(len(tuple(m.patch_size)) == 3 and all(int(p) > 0 for p in m.patch_size), "model.patch_size",
           f"{m.patch_size!r} must be three positive ints (t, h, w)")
    _check(m.text_dim == t.d_model, "model.text_dim",
           f"{m.text_dim} but text_encoder.d_model={t.d_model}; the DiT's text embedder reads the encoder's output, "
           f"set model.text_dim={t.d_model}")


def grid_step(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(t, h, w) latent cells the DiT's grid must be a multiple of: its patch, `model.patch_size`."""
    return tuple(int(p) for p in config.model.patch_size)


def check_context(config: ml_collections.ConfigDict, context: int, grid: tuple[int, int, int]) -> None:
    """`mesh.context` > 1 against the DiT, which splits its video tokens over it
    (`ttm_jax/models/context_parallel.py`): Ulysses splits the heads per tensor shard, both split the tokens of the
    latent `grid` (T', H', W')."""
    m = config.model
    heads = m.get("num_heads")
    tensor = dict(config.mesh.shape).get("tensor", 1)
    if isinstance(heads, int) and tensor > 1 and heads % tensor == 0:
        heads //= tensor  # heads per tensor shard, what Ulysses splits
    _check(m.context_impl != "ulysses" or not isinstance(heads, int) or heads % context == 0,
           "mesh.context",
           f"{context} does not divide the {heads} heads (model.num_heads per mesh.shape.tensor shard) that "
           f"model.context_impl='ulysses' splits; choose a mesh.context dividing {heads}, or model.context_impl='ring'")
    t, hh, ww = grid
    pt, ph, pw = grid_step(config)
    if not (t % pt or hh % ph or ww % pw):  # else the model check names the patch size
        tokens = (t // pt) * (hh // ph) * (ww // pw)
        _check(tokens % context == 0, "mesh.context",
               f"{context} does not divide the {tokens} video tokens (latent {(t, hh, ww)} in patches "
               f"{(pt, ph, pw)}) the DiT splits over it; choose a mesh.context dividing {tokens}, or data.num_frames "
               f"/ height / width whose token count it divides")
