"""TTM's added layers (the paper's contribution to the DiT block), in Flax Linen, built from the generic blocks of
`ttm_jax/models/layers.py`.

In the first `model.ttm_layers` blocks of a stage-2 DiT (`ttm_jax/backbones/wan/model.py`): `MaskedSelfAttention` (a
video token attends only to tokens of its own object, across frames) after the block's self-attention, and
`MaskedCrossAttention` (a video token attends only to its object's local prompt) after its cross-attention. Each is
`x + attn(LayerNorm(x))` with its own affine norm (`norm`) and attention (`attn`), and a zero-initialised output
projection, so a fresh layer is the identity. Masks are integer ids (`ttm_jax/models/masks.py`), never dense.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttm_jax.models import layers, masks

# the added layers' module names, in every backbone's tree (the TTM export: `ttm_jax/weights/ttm_export.py`)
TTM_MODULES = ("masked_self_attn", "masked_cross_attn")


def _added_attention(layer: nn.Module, x: jax.Array, **attend: Any) -> jax.Array:
    """The frame both TTM layers share: `x + attn(norm(x))`, an affine LayerNorm (`norm`) and an `Attention` (`attn`)
    with a zero-initialised output. Called inside `layer`'s compact `__call__`, so the submodules are `layer`'s."""
    h = layers.LayerNorm(layer.eps, affine=True, param_dtype=layer.param_dtype, name="norm")(x).astype(layer.dtype)
    out = layers.Attention(layer.dim, layer.num_heads, layer.eps, layer.qk_norm, layer.impl, zero_init_out=True,
                           dtype=layer.dtype, param_dtype=layer.param_dtype, context_impl=layer.context_impl,
                           name="attn")(h, **attend)
    return x + out.astype(x.dtype)


class _AddedLayer(nn.Module):
    """The fields both added layers share: width, heads, norms, whether the mask applies, kernel, dtypes, and the
    context-parallel attention under a mesh with `context` > 1 (`layers.Attention.context_impl`; the object ids are
    sharded with their tokens)."""

    dim: int
    num_heads: int
    eps: float = 1e-6
    qk_norm: bool = True
    masked: bool = True
    impl: str = "xla"
    dtype: layers.Dtype = jnp.float32
    param_dtype: layers.Dtype = jnp.float32
    context_impl: str | None = None


class MaskedSelfAttention(_AddedLayer):
    """TTM's added masked self-attention: `x + attn(LayerNorm(x))`, token i attends j iff `token_ids` are equal.

    Its own affine LayerNorm (`norm`), its own q/k/v/out with q/k RMS norms and the block's RoPE (`attn`), and a
    zero-initialised `attn/to_out`, so a fresh layer is the identity. `masked=False` is the unmasked twin (the paper's
    TI2V baseline): the same parameters, full attention. x `[B, N, dim]`, token_ids int32 `[B, N]` -> `[B, N, dim]`;
    token_ids may be a `sparse_attention.ObjectSort` of the ids (`config.model.attention_sparse`, built once by the
    DiT): the same result, computing only same-object (query block, key chunk) pairs.
    """

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
                 token_ids: jax.Array | None) -> jax.Array:
        if self.masked and token_ids is None:
            raise ValueError("ttm_layers.MaskedSelfAttention: masked=True needs token_ids int32 [B, N] "
                             "(or config.model.ttm_masked=False for the unmasked baseline)")
        ids = token_ids if self.masked else None
        return _added_attention(self, x, rope=rope, q_ids=ids, kv_ids=ids)


class MaskedCrossAttention(_AddedLayer):
    """TTM's added masked cross-attention: `x + attn(LayerNorm(x), local_context)`.

    Video token i attends local-prompt token j iff `cross_token_ids[i] == local_ids[j]` (padding -1 never); a query
    whose object has no prompt token is remapped to slot 0, the caption (`masks.sanitize_query_ids`), so no row is
    empty. `masked=False` attends every non-padding local token. Zero-initialised `attn/to_out`.

    x `[B, N, dim]`; local_context `[B, S*Lp, dim]` (already through the DiT's text embedder); cross_token_ids int32
    `[B, N]`; local_ids int32 `[B, S*Lp]` -> `[B, N, dim]`.
    """

    @nn.compact
    def __call__(self, x: jax.Array, local_context: jax.Array, cross_token_ids: jax.Array | None,
                 local_ids: jax.Array | None) -> jax.Array:
        if self.masked:
            if cross_token_ids is None or local_ids is None:
                raise ValueError("ttm_layers.MaskedCrossAttention: masked=True needs cross_token_ids [B, N] and "
                                 "local_ids [B, S*Lp] (or config.model.ttm_masked=False for the unmasked baseline)")
            q_ids = masks.sanitize_query_ids(cross_token_ids, local_ids)
            kv_ids = local_ids
        elif local_ids is not None:
            # Unmasked: one shared id for every query and real key; padding stays out.
            q_ids = jnp.zeros(x.shape[:2], jnp.int32)
            kv_ids = jnp.where(local_ids >= 0, 0, -1).astype(jnp.int32)
        else:
            q_ids = kv_ids = None
        return _added_attention(self, x, context=local_context, q_ids=q_ids, kv_ids=kv_ids)
