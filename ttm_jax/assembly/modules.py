"""`Modules`: what a stage trains and what it keeps frozen, built by name from the registries."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import ml_collections

from ttm_jax.assembly import registry
from ttm_jax.models import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Modules:
    """What a run trains and what it keeps frozen.

    model: Flax module, the backbone's call `(x, timestep, context, **kwargs) -> [B, T', H', W', C]` (CONTRIBUTING.md).
    text_encoder: Flax module `(ids [B, L] int32, mask [B, L] bool) -> [B, L, text_dim]` (frozen).
    autoencoder: `encode(video [B,T,H,W,3] in [-1,1]) -> [B,T',H',W',C]`, `decode`, `time_factor`, `space_factor`.
    tokenizer: `encode(texts, max_length) -> (ids, mask)`; only the empty prompt is tokenized by the stage itself.
    text_zero_padding: whether the stage zeroes the text encoder's outputs at padding positions (the
      `TEXT_ENCODERS` entry's `zero_padding`: True for T5 / umT5 as Wan, False for CLIP as SD 1.5).
    """

    model: nn.Module
    text_encoder: nn.Module
    autoencoder: Any
    tokenizer: Any
    text_zero_padding: bool = True


def build_modules(config: ml_collections.ConfigDict) -> Modules:
    """The real modules the config names (`model.backbone`, `text_encoder.name`, `autoencoder.name`,
    `text_encoder.tokenizer`); frozen weights are read from the config's paths."""
    entry = registry.text_encoder(config)
    return Modules(
        model=registry.build_backbone(config),
        text_encoder=entry.build(config.text_encoder),
        autoencoder=registry.make_autoencoder(config.autoencoder),
        tokenizer=tokenizer_lib.make_tokenizer(config.text_encoder),
        text_zero_padding=entry.zero_padding,
    )
