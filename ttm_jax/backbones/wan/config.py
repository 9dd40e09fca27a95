"""The Wan DiT's config-level part (`config.model.backbone = "dit"`): `check`, its fields' checks, which
`ttm_jax/config/checks.py` calls by `model.backbone` (`BACKBONE_CHECKS`). Layer 0: imports only `ttm_jax.cli`."""

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
