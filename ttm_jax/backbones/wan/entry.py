"""The Wan DiT's registry entry (`config.model.backbone = "dit"`; `assembly/registry.py` registers `BACKBONE`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ttm_jax import config as config_lib
from ttm_jax.assembly.backbone import Backbone, stage_init_inputs
from ttm_jax.backbones.wan import export as wan_export
from ttm_jax.backbones.wan import model as dit_lib
from ttm_jax.backbones.wan import weights as dit_convert
from ttm_jax.models import masks


def model_config(config: ml_collections.ConfigDict) -> dit_lib.DiTConfig:
    return dit_lib.DiTConfig.from_config(config.model)


def build(config: ml_collections.ConfigDict) -> nn.Module:
    return dit_lib.DiT(config.model, config_lib.in_channels(config), config.autoencoder.latent_channels)


# the smallest inputs: one patch (`full=False`); or the configured latent grid
init_inputs = stage_init_inputs(dit_lib.init_inputs, model_config)


def object_ids(config: ml_collections.ConfigDict, ae: Any, object_masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token ids in the DiT's `(t, h, w)` patch order: by area majority for masked self-attention, by box or mask
    (`config.model.cross_ids_from`) for masked cross-attention (`ttm_jax/models/masks.py`)."""
    geometry = dict(time_factor=ae.time_factor, space_factor=ae.space_factor,
                    patch_size=tuple(config.model.patch_size))
    by = masks.token_ids_from_boxes if config.model.cross_ids_from == "bbox" else masks.token_ids_from_masks
    return masks.token_ids_from_masks(object_masks, **geometry), by(object_masks, **geometry)


def video_tokens(config: ml_collections.ConfigDict) -> int:
    """Video tokens per example: the latent grid in the DiT's patches."""
    t, h, w = config_lib.latent_shape(config)[:3]
    pt, ph, pw = (int(p) for p in config.model.patch_size)
    return (t // pt) * (h // ph) * (w // pw)


# values saved per token and layer by remat policy: (D-wide, not split; D-wide split over tensor; F-wide split over
# tensor), and what TTM's two added layers add in their blocks (`activations`)
_SAVED = {"none": ((8, 19, 2), (4, 11, 0)), "dots": ((3, 10, 1), (2, 10, 0)), "dots_no_batch": ((3, 10, 1), (2, 10, 0)),
          "full": ((1, 0, 0), (0, 0, 0))}


def activations(config: ml_collections.ConfigDict, tokens: int, tensor: int) -> tuple[int, str]:
    """(bytes per device, how) of the activations a DiT training step saves for the backward pass, an ESTIMATE:

      activations = layers x tokens per device x values saved per token and layer x bytes of `model.dtype`
                    (+ one layer's full set, recomputed in the backward pass, under remat_policy=full)
      values per token and layer (D = dim, F = ffn_dim, t = mesh `tensor` size; `_SAVED`):
        none           8 D + (19 D + 2 F) / t       every block intermediate (norms, residuals, q/k/v before and
                                                     after norm and RoPE, attention outputs, FFN hidden before and
                                                     after GELU)
        dots,
        dots_no_batch  3 D + (10 D + F) / t         the projections' outputs and the attention residuals (q, k, v, o)
        full           D                            the block input only
      TTM's blocks add 4 D + 11 D / t (none), 2 D + 10 D / t (dots).

    Not counted: the attention's own working set (the Pallas / splash kernels keep O(tokens) statistics; the XLA
    fallback holds [heads, Lq, Lk] logits per layer), the text embeddings (~10^2 tokens), XLA's temporaries and
    fragmentation: read the figure as a floor.
    """
    m = config.model
    d, f = int(m.dim), int(m.ffn_dim)
    policy = m.remat_policy
    (a, b, c), (ta, tb, tc) = _SAVED.get(policy, _SAVED["none"])
    per_token = a * d + (b * d + c * f) / tensor
    ttm_extra = ta * d + (tb * d + tc * f) / tensor
    layers, k = int(m.num_layers), int(m.ttm_layers)
    item = jnp.dtype(m.dtype).itemsize
    values = layers * per_token + k * ttm_extra
    how = f"{layers} layers x {tokens:,} tokens x {per_token / d:.3g} D"
    if k and ttm_extra:
        how += f" (+{ttm_extra / d:.3g} D in {k} TTM blocks)"
    if policy == "full":
        (a2, b2, c2), _ = _SAVED["none"]
        values += a2 * d + (b2 * d + c2 * f) / tensor
        how += " + one layer's full set (recomputed in the backward)"
    how += f", D={d}, {jnp.dtype(m.dtype).name}, remat {policy}: ESTIMATE"
    return int(values * tokens * item), how


BACKBONE = Backbone(
    build=build, init_inputs=init_inputs, object_ids=object_ids,
    state_fields=tuple(f"model.{k}" for k in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim",
                                              "ttm_layers", "patch_size", "qk_norm", "cross_attn_norm",
                                              "scan_layers", "param_dtype")),
    config_type=dit_lib.DiTConfig, model_config=model_config, template=dit_convert.template,
    export=wan_export.export, import_folder=wan_export.import_folder,
    converted_config=lambda meta: dit_lib.DiTConfig.from_config(meta["model"]),
    layout="Wan 2.1 layout", ttm_where="blocks", video_tokens=video_tokens,
    flops_overrides={"scan_layers": False}, activations=activations)
