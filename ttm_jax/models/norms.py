"""The normalisations the backbones, the text encoder and the autoencoders share, each defined once. Statistics are
always computed in float32 whatever the activations' dtype (bf16 sums of squares lose the small channels), and the
parameter names are those the weight converters map (`scale`, `bias`, `gamma`), so a checkpoint's tree keys do not
depend on which model holds the norm.

- `RMSNorm`: `x / sqrt(mean(x^2) + eps) * scale` over the last axis (`torch.nn.RMSNorm`, T5's LayerNorm, Wan's q/k
  norms across heads).
- `L2Norm`: `x / max(|x|_2, 1e-12) * sqrt(C) * gamma` over channels, diffusers' `WanRMS_norm` (`F.normalize`); not
  the RMSNorm above: no eps inside the root and a clamp instead, so the two differ for small `x`.
- `GroupNorm`: torch `GroupNorm` channels-last over `[N, ..., C]` (SD's VAE per image, the U-Net's resnets per image,
  its motion modules per video over `(T, H, W)`), two-pass variance.

Layer 1: imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _init(init: nn.initializers.Initializer, axis_name: str | None) -> nn.initializers.Initializer:
    """`init` with its one logical axis attached, or plain when `axis_name` is None (the VAEs' params carry none)."""
    return init if axis_name is None else nn.with_logical_partitioning(init, (axis_name,))


class RMSNorm(nn.Module):
    """RMS norm over the last axis, in float32: `[..., D] -> [..., D]` in `dtype`; param `scale [D]` on the logical
    axis `axis_name` (`heads` for Wan's q/k norms over the fused `heads * head_dim` axis, `text_embed` for T5)."""

    eps: float = 1e-6
    axis_name: str = "heads"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", _init(nn.initializers.ones_init(), self.axis_name), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class L2Norm(nn.Module):
    """diffusers' `WanRMS_norm` over channels: `x / max(|x|_2, 1e-12) * sqrt(C) * gamma`, in float32; param
    `gamma [C]` (no logical axis)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * (c**0.5) * gamma.astype(jnp.float32)
        return y.astype(self.dtype)


class GroupNorm(nn.Module):
    """torch `GroupNorm(groups, C, eps)` channels-last: x `[N, ..., C]`, statistics per example over every non-batch
    axis within each of `groups` channel groups, float32 math; params `scale`, `bias` `[C]` (on the logical axis
    `axis_name`, or none when it is None). Returns `dtype`."""

    groups: int
    eps: float
    axis_name: str | None = "embed"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _init(nn.initializers.ones_init(), self.axis_name), (c,), self.param_dtype)
        bias = self.param("bias", _init(nn.initializers.zeros_init(), self.axis_name), (c,), self.param_dtype)
        x32 = x.astype(jnp.float32).reshape(x.shape[0], -1, self.groups, c // self.groups)
        mean = jnp.mean(x32, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=(1, 3), keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
