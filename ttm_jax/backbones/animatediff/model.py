"""The AnimateDiff (V3) video U-Net in Flax Linen: SD 1.5's `UNet2DConditionModel` layout with AnimateDiff motion
modules, i.e. diffusers' `UNetMotionModel` (= `UNet2DConditionModel` + `MotionAdapter`), channels-last, plus TTM's
masked layers in the encoder's spatial transformers.

Forward, for x `[B, T, H, W, in_channels]` (latents, already channel-concatenated with their conditions), timestep
`[B]` (DDPM units, 0..1000) and text `[B, L, cross_attention_dim]` (CLIP hidden states):

  conv_in (3x3) -> `[B*T, H, W, C0]` (frames folded into the batch: every 2D layer works per frame)
  time: sinusoid(timestep, C0) -> time_embedding (linear, SiLU, linear) -> temb `[B, 4*C0]`, repeated per frame
  down block i (level i, resolution H / 2^i), `layers_per_block` times:
      resnet (GroupNorm, SiLU, conv3x3, + time_emb_proj(SiLU(temb)), GroupNorm, SiLU, conv3x3, + shortcut)
      spatial transformer (CrossAttn blocks only; per frame: GroupNorm, proj_in, transformer blocks, proj_out,
          + residual; a block is  x += attn1(LN(x)); [TTM masked self-attn]; x += attn2(LN(x), text);
          [TTM masked cross-attn]; x += GEGLU-FF(LN(x)))
      motion module (temporal transformer: GroupNorm over (T, H, W) per video, proj_in, blocks over the T frames
          of each pixel with a sinusoidal frame embedding added before both self-attentions, proj_out, + residual)
      each output is a skip; then downsample (3x3 conv, stride 2) except on the last level, a skip too
  mid block: resnet, then (spatial transformer, motion module, resnet) x mid_block_layers
      (`use_motion_mid_block=False`: diffusers' `UNetMidBlock2DCrossAttn`, no motion module)
  up block i (reversed levels), `layers_per_block + 1` times: concat the last skip, resnet, [spatial transformer],
      motion module; then nearest 2x upsample + 3x3 conv except on the last
  conv_norm_out (GroupNorm), SiLU, conv_out (3x3) -> `[B, T, H, W, out_channels]` float32.

Parameter tree (unboxed): diffusers' names, each block's submodule flattened into one name (`down_blocks.0.resnets.1`
-> `down_blocks_0_resnets_1`), below it `/` for `.` and `_k` for list indices (`transformer_blocks_0/attn1/to_q`):
conv kernels are `[kh, kw, in, out]` (torch `[out, in, kh, kw]` permuted), Dense kernels `[in, out]`, norm weights
`scale`; attention `to_out` is diffusers' `to_out.0`; the GEGLU feed-forward is `ff/proj_in` (`ff.net.0.proj`) and
`ff/proj_out` (`ff.net.2`). The motion modules' `pos_embed.pe` buffers are recomputed (`sinusoid_table`), not
parameters. TTM's added layers sit in `down_blocks_i_attentions_j/transformer_blocks_k/{masked_self_attn,
masked_cross_attn}` (`ttm_jax/models/ttm_layers.py`, zero-initialised output projections).

TTM layers (`ttm_layers = K > 0`): the first K spatial transformers of the encoder (diffusers order: down block,
then attention index; SD 1.5 has 6), every transformer block in them. Object ids come in the U-Net's own token
layout (`object_ids`): the ids of every *TTM level* (a down block holding a TTM transformer) at that level's
resolution, each `(t, h, w)` row-major, concatenated level by level into one int32 `[B, N]`, `N = sum_l T * H_l * W_l`.
Masked self-attention runs over all tokens of the video at that level (`ttm_self_across_frames=True`, the paper's
"masked spatio-temporal self-attention": an object's tokens see the same object in every frame) or within each frame
(`False`, T times cheaper, the U-Net's own spatial attention pattern). Masked cross-attention is per frame (keys are
prompt tokens, so this is the same function either way).

The added layers are `ttm_layers.MaskedSelfAttention` / `MaskedCrossAttention` as in the DiT (own affine LayerNorm,
q/k/v/out with biases, q/k RMS norms when `ttm_qk_norm`, no RoPE: the U-Net has no positional embedding in space);
their keys/values for the cross layer are the raw local-prompt text states (`cross_attention_dim` wide), as the
U-Net's own cross-attention reads the caption's.

Inputs differ from diffusers' in layout only: diffusers takes `[B, C, T, H, W]` and the text repeated per frame
(`[B*T, L, D]`, as its AnimateDiff pipeline does); here `[B, T, H, W, C]` and `[B, L, D]` (repeated inside).

Helpers: `UNetConfig.from_config(config.model)`, `init_inputs` (the one definition of the inputs), `object_ids`
(masks -> the concatenated per-level ids), `expand_input_channels` / `graft_backbone` (a stage model from a converted
backbone, `ttm_jax/backbones/animatediff/weights.py`), `sinusoid_table`.

Logical axis names (CONTRIBUTING.md): conv kernels `(None, None, None, "embed")` (`in_channels` on `conv_in`,
`out_channels` on `conv_out`), Dense `("embed", "heads")` / `("heads", "embed")` in attention, `("text_embed",
"heads")` for cross-attention keys/values, `("embed", "mlp")` / `("mlp", "embed")` in the feed-forward, norms
`("embed",)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from ttm_jax.models import attention as attention_ops
from ttm_jax.models import layers, masks, norms, remat, sparse_attention, ttm_layers

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlockMotion", "DownBlockMotion"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlockMotion", "UpBlockMotion"
TTM_MODULES = ttm_layers.TTM_MODULES
Dtype = Any


def _per_level(value: Any, n: int, field: str) -> tuple[int, ...]:
    if isinstance(value, int | np.integer):
        return (int(value),) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"unet.UNetConfig: config.model.{field}={value} needs one value per level ({n})")
    return out


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The model fields `UNet` reads, frozen (hashable); `from_config(config.model)` builds it. Defaults: SD 1.5 +
    AnimateDiff V3 (`guoyww/animatediff-motion-adapter-v1-5-3`)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    num_attention_heads: int | tuple[int, ...] = 8  # spatial heads per level (head dim = channels // heads)
    cross_attention_dim: int = 768  # the text width (CLIP ViT-L/14 hidden size)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    transformer_layers_per_block: int = 1
    use_linear_projection: bool = False
    mid_block_scale_factor: float = 1.0
    mid_block_layers: int = 1
    use_motion_mid_block: bool = True
    motion_num_attention_heads: int | tuple[int, ...] = 8
    motion_max_seq_length: int = 32  # the most frames the motion modules take
    temporal_transformer_layers_per_block: int = 1
    temporal_transformer_layers_per_mid_block: int = 1
    ttm_layers: int = 0  # encoder spatial transformers with TTM's added layers (SD 1.5: up to 6)
    ttm_masked: bool = True
    ttm_masked_self: bool = True
    ttm_masked_cross: bool = True
    ttm_self_across_frames: bool = True
    ttm_qk_norm: bool = True
    attention: str = "xla"
    attention_sparse: bool = False  # object-sparse masked self-attention (`sparse_attention`), one sort per level
    remat_policy: str = "none"  # or one of remat.POLICIES: per resnet / spatial transformer / motion module
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Any) -> UNetConfig:
        """From `config.model` (a ConfigDict or mapping) or a `UNetConfig`; unknown keys are ignored."""
        if isinstance(config, cls):
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        items = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
        kw = {k: v for k, v in items.items() if k in names}
        for k in ("block_out_channels", "down_block_types", "up_block_types"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("num_attention_heads", "motion_num_attention_heads"):
            if k in kw and not isinstance(kw[k], int | np.integer):
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"unet.UNetConfig: config.model.{field}: {msg}")

        n = len(self.block_out_channels)
        need(len(self.down_block_types) == n and len(self.up_block_types) == n, "down_block_types",
             f"down_block_types ({len(self.down_block_types)}), up_block_types ({len(self.up_block_types)}) and "
             f"block_out_channels ({n}) must have the same length")
        need(all(t in (CROSS_DOWN, PLAIN_DOWN) for t in self.down_block_types), "down_block_types",
             f"{self.down_block_types}: each must be {CROSS_DOWN} or {PLAIN_DOWN}")
        need(all(t in (CROSS_UP, PLAIN_UP) for t in self.up_block_types), "up_block_types",
             f"{self.up_block_types}: each must be {CROSS_UP} or {PLAIN_UP}")
        for c in self.block_out_channels:
            need(c % self.norm_num_groups == 0, "norm_num_groups",
                 f"{self.norm_num_groups} does not divide block_out_channels entry {c}")
        for field, heads in (("num_attention_heads", self.heads), ("motion_num_attention_heads", self.motion_heads)):
            for c, h in zip(self.block_out_channels, heads, strict=True):
                need(c % h == 0, field, f"{h} heads do not divide {c} channels")
        need(self.remat_policy == "none" or self.remat_policy in remat.POLICIES, "remat_policy",
             f"{self.remat_policy!r}; choose none or one of {sorted(remat.POLICIES)}")
        need(0 <= self.ttm_layers <= self.num_encoder_transformers, "ttm_layers",
             f"{self.ttm_layers} must be in [0, {self.num_encoder_transformers}] (the encoder's spatial "
             f"transformers: layers_per_block x the {CROSS_DOWN} blocks)")

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_level(self.num_attention_heads, len(self.block_out_channels), "num_attention_heads")

    @property
    def motion_heads(self) -> tuple[int, ...]:
        return _per_level(self.motion_num_attention_heads, len(self.block_out_channels), "motion_num_attention_heads")

    @property
    def num_encoder_transformers(self) -> int:
        return self.layers_per_block * sum(t == CROSS_DOWN for t in self.down_block_types)

    @property
    def downscale(self) -> int:
        """H and W must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def ttm_slots(self) -> dict[tuple[int, int], int]:
        """{(down block, attention index): TTM level} of the transformers carrying TTM layers."""
        out, count = {}, 0
        for i, kind in enumerate(self.down_block_types):
            if kind != CROSS_DOWN:
                continue
            for j in range(self.layers_per_block):
                if count < self.ttm_layers:
                    out[(i, j)] = i
                count += 1
        return out

    def ttm_levels(self) -> tuple[int, ...]:
        """The down-block indices (resolution levels, H / 2^level) holding TTM transformers, ascending."""
        return tuple(sorted(set(self.ttm_slots().values())))

    def ttm_tokens(self, frames: int, height: int, width: int) -> dict[int, tuple[int, int]]:
        """{level: (offset, length)} of each TTM level's ids in the concatenated `[B, N]` layout, and N."""
        out, off = {}, 0
        for level in self.ttm_levels():
            n = frames * (height >> level) * (width >> level)
            out[level] = (off, n)
            off += n
        return out

    @property
    def mask_self(self) -> bool:
        return bool(self.ttm_masked and self.ttm_masked_self)

    @property
    def mask_cross(self) -> bool:
        return bool(self.ttm_masked and self.ttm_masked_cross)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


def sinusoid_table(dim: int, length: int) -> np.ndarray:
    """AnimateDiff's frame embedding float32 `[length, dim]`: sin at even, cos at odd channels, frequency
    `10000^(-2i/dim)` (diffusers' `SinusoidalPositionalEmbedding.pe[0]`), computed in float64 and rounded once."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, dim, 2, dtype=np.float64) * (-math.log(10000.0) / dim))
    pe = np.zeros((length, dim), np.float64)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div)
    return pe.astype(np.float32)


def _conv(features: int, kernel: int, *, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1,
          axes: tuple[str | None, ...] = (None, None, None, "embed")) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=param_dtype,
                   kernel_init=layers.logical_init(nn.initializers.lecun_normal(), axes),
                   bias_init=layers.logical_init(nn.initializers.zeros_init(), axes[-1:]), name=name)


class ResnetBlock(nn.Module):
    """diffusers' `ResnetBlock2D` (default time-embedding norm): x `[N, H, W, Cin]`, temb `[N, Temb]` ->
    `[N, H, W, out_channels]`."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(norms.GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = _conv(self.out_channels, 3, name="conv1", **kw)(h)
        t = layers.dense(self.out_channels, (None, "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
        h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(norms.GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = _conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)


class Attention(nn.Module):
    """diffusers' `Attention` as SD 1.5 / AnimateDiff use it: `to_q/to_k/to_v` without bias, `to_out` with bias,
    scale `head_dim^-0.5`. x `[N, L, dim]`; context `[N, Lk, Dk]` or None (self-attention) -> `[N, L, dim]`."""

    dim: int
    num_heads: int
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        kv_in, kv_axes = (x, ("embed", "heads")) if context is None else (context, ("text_embed", "heads"))
        hd = self.dim // self.num_heads
        q = layers.dense(self.dim, ("embed", "heads"), name="to_q", **kw)(x)
        k = layers.dense(self.dim, kv_axes, name="to_k", **kw)(kv_in)
        v = layers.dense(self.dim, kv_axes, name="to_v", **kw)(kv_in)
        split = lambda a: a.reshape(*a.shape[:2], self.num_heads, hd)  # noqa: E731
        out = attention_ops.dot_product_attention(split(q), split(k), split(v), impl=self.impl, scale=hd**-0.5)
        out = out.reshape(*out.shape[:2], self.dim)
        return layers.dense(self.dim, ("heads", "embed"), name="to_out", dtype=self.dtype,
                            param_dtype=self.param_dtype)(out)


class GEGLUFeedForward(nn.Module):
    """diffusers' `FeedForward(activation_fn="geglu")`: `proj_in` to 2 x 4 dim, `hidden * GELU(gate)` (exact GELU),
    `proj_out`. `[N, L, dim]` -> same."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.dense(2 * self.mult * self.dim, ("embed", "mlp"), name="proj_in", **kw)(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        h = hidden * nn.gelu(gate, approximate=False)
        return layers.dense(self.dim, ("mlp", "embed"), name="proj_out", **kw)(h)


@struct.dataclass
class TTMInputs:
    """What a TTM transformer's added layers need, already laid out per frame / per video for its level:
    `self_ids` `[B, T*h*w]` (across frames) or `[B*T, h*w]` (per frame), a `sparse_attention.ObjectSort` of them
    (`attention_sparse`), or None (unmasked); `local_context`
    `[B*T, Ll, Dt]`; `cross_ids` `[B*T, h*w]` and `local_ids` `[B*T, Ll]` (None: unmasked); `frames` T."""

    frames: int = struct.field(pytree_node=False)
    local_context: jax.Array
    self_ids: jax.Array | sparse_attention.ObjectSort | None
    cross_ids: jax.Array | None
    local_ids: jax.Array | None


class TransformerBlock(nn.Module):
    """diffusers' `BasicTransformerBlock` (layer norms, GEGLU): x `[N, L, dim]`.

    Spatial (`double_self_attention=False`): attn1 self, attn2 to `context`. Temporal (motion module,
    `double_self_attention=True`, `positions` = the frame table `[Lmax, dim]`): attn1 and attn2 both self-attention,
    the frame embedding added to the normed input of each. With `ttm`, TTM's masked self-attention follows attn1 and
    masked cross-attention follows attn2.
    """

    dim: int
    num_heads: int
    double_self_attention: bool = False
    positions: int = 0  # > 0: the motion modules' sinusoidal frame embedding table length
    ttm: bool = False
    cfg: UNetConfig | None = None
    eps: float = 1e-5
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, ttm: TTMInputs | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(dim=self.dim, num_heads=self.num_heads, impl=self.impl, **kw)
        pe = None
        if self.positions:
            pe = jnp.asarray(sinusoid_table(self.dim, self.positions)[:x.shape[1]])[None]

        def normed(name: str, positions: bool = True) -> jax.Array:
            h = layers.LayerNorm(self.eps, affine=True, param_dtype=self.param_dtype, name=name)(x)
            return (h if pe is None or not positions else h + pe).astype(self.dtype)

        x = x + Attention(**attn, name="attn1")(normed("norm1"))
        if self.ttm:
            x = self._masked_self(x, ttm)
        x = x + Attention(**attn, name="attn2")(normed("norm2"),
                                               None if self.double_self_attention else context)
        if self.ttm:
            c = self.cfg
            layer = ttm_layers.MaskedCrossAttention(self.dim, self.num_heads, qk_norm=c.ttm_qk_norm,
                                                    masked=c.mask_cross, impl=self.impl, **kw,
                                                    name="masked_cross_attn")
            x = layer(x, ttm.local_context, ttm.cross_ids, ttm.local_ids)
        return x + GEGLUFeedForward(self.dim, **kw, name="ff")(normed("norm3", positions=False))

    def _masked_self(self, x: jax.Array, ttm: TTMInputs) -> jax.Array:
        c = self.cfg
        layer = ttm_layers.MaskedSelfAttention(self.dim, self.num_heads, qk_norm=c.ttm_qk_norm, masked=c.mask_self,
                                               impl=self.impl, dtype=self.dtype, param_dtype=self.param_dtype,
                                               name="masked_self_attn")
        if not c.ttm_self_across_frames:
            return layer(x, None, ttm.self_ids)
        n, hw, d = x.shape  # [B*T, hw, D] -> one sequence per video [B, T*hw, D]
        t = ttm.frames
        y = layer(x.reshape(n // t, t * hw, d), None, ttm.self_ids)
        return y.reshape(n, hw, d)


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` (continuous input) per frame: x `[N, H, W, C]`, context `[N, L, Dt]` ->
    `[N, H, W, C]`. GroupNorm (eps 1e-6), proj_in (1x1 conv, or Dense with `use_linear_projection`), blocks,
    proj_out, + residual."""

    num_heads: int
    num_layers: int
    groups: int
    linear: bool = False
    ttm: bool = False
    cfg: UNetConfig | None = None
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, ttm: TTMInputs | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, h, w, c = x.shape
        y = norms.GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
        proj_in = (layers.dense(c, (None, "embed"), name="proj_in", **kw) if self.linear
                   else _conv(c, 1, name="proj_in", **kw))
        y = proj_in(y).reshape(n, h * w, c)
        for k in range(self.num_layers):
            y = TransformerBlock(c, self.num_heads, ttm=self.ttm, cfg=self.cfg, impl=self.impl, **kw,
                                 name=f"transformer_blocks_{k}")(y, context, ttm)
        y = y.reshape(n, h, w, c)
        proj_out = (layers.dense(c, (None, "embed"), name="proj_out", **kw) if self.linear
                    else _conv(c, 1, name="proj_out", **kw))
        return (proj_out(y) + x).astype(self.dtype)


class MotionModule(nn.Module):
    """AnimateDiff's motion module (diffusers' `AnimateDiffTransformer3D`): x `[B*T, H, W, C]` with `frames` = T ->
    same. GroupNorm over each video's (T, H, W) (eps 1e-6), proj_in, temporal blocks over the T frames of every
    pixel (sinusoidal frame embedding, two self-attentions), proj_out, + residual."""

    num_heads: int
    num_layers: int
    groups: int
    max_frames: int
    impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, frames: int) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, h, w, c = x.shape
        b = n // frames
        y = norms.GroupNorm(self.groups, 1e-6, name="norm", **kw)(x.reshape(b, frames, h, w, c))
        y = y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, frames, c)
        y = layers.dense(c, (None, "embed"), name="proj_in", **kw)(y)
        for k in range(self.num_layers):
            y = TransformerBlock(c, self.num_heads, double_self_attention=True, positions=self.max_frames,
                                 impl=self.impl, **kw, name=f"transformer_blocks_{k}")(y)
        y = layers.dense(c, (None, "embed"), name="proj_out", **kw)(y)
        y = y.reshape(b, h, w, frames, c).transpose(0, 3, 1, 2, 4).reshape(n, h, w, c)
        return (y + x).astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The U-Net


class UNet(nn.Module):
    """The AnimateDiff video U-Net (module docstring). `config`: `config.model` (ConfigDict) or a `UNetConfig`."""

    config: Any
    in_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array, context: jax.Array, *,
                 local_context: jax.Array | None = None, token_ids: jax.Array | None = None,
                 cross_token_ids: jax.Array | None = None, local_ids: jax.Array | None = None) -> jax.Array:
        """x `[B, T, H, W, in_channels]`, timestep `[B]` (0..1000), context `[B, L, cross_attention_dim]`; with TTM
        layers local_context `[B, S*Lp, cross_attention_dim]`, token_ids / cross_token_ids int32 `[B, N]` in the
        U-Net's layout (`object_ids`), local_ids int32 `[B, S*Lp]` -> `[B, T, H, W, out_channels]` float32."""
        c = UNetConfig.from_config(self.config)
        dt, pdt = c.compute_dtype, c.weight_dtype
        kw = dict(dtype=dt, param_dtype=pdt)
        b, t, hh, ww = self._check_inputs(c, x, timestep, context, local_context, token_ids, cross_token_ids,
                                          local_ids)
        chans, n_levels = c.block_out_channels, len(c.block_out_channels)
        heads, mheads = c.heads, c.motion_heads
        resnet = remat.maybe_remat(ResnetBlock, c.remat_policy)
        spatial = remat.maybe_remat(SpatialTransformer, c.remat_policy)
        motion = remat.maybe_remat(MotionModule, c.remat_policy, static_argnums=(2,))
        res_kw = dict(groups=c.norm_num_groups, eps=c.norm_eps, **kw)

        def spatial_kw(level_heads: int) -> dict[str, Any]:
            return dict(num_heads=level_heads, num_layers=c.transformer_layers_per_block, groups=c.norm_num_groups,
                        linear=c.use_linear_projection, impl=c.attention, **kw)

        def motion_kw(level_heads: int, layers_: int) -> dict[str, Any]:
            return dict(num_heads=level_heads, num_layers=layers_, groups=c.norm_num_groups,
                        max_frames=c.motion_max_seq_length, impl=c.attention, **kw)

        temb = layers.TimestepEmbedder(4 * chans[0], param_dtype=pdt, name="time_embedding")(
            layers.timestep_embedding(timestep, chans[0]))
        temb = jnp.repeat(temb.astype(dt), t, axis=0)  # [B*T, 4*C0]
        ctx = jnp.repeat(context.astype(dt), t, axis=0)  # [B*T, L, Dt]
        ttm_in = self._ttm_inputs(c, t, hh, ww, local_context, token_ids, cross_token_ids, local_ids)

        h = x.astype(dt).reshape(b * t, hh, ww, x.shape[-1])
        h = _conv(chans[0], 3, name="conv_in", axes=(None, None, "in_channels", "embed"), **kw)(h)
        skips = [h]
        slots = c.ttm_slots()
        for i, kind in enumerate(c.down_block_types):
            p = f"down_blocks_{i}"
            for j in range(c.layers_per_block):
                h = resnet(chans[i], **res_kw, name=f"{p}_resnets_{j}")(h, temb)
                if kind == CROSS_DOWN:
                    level = slots.get((i, j))
                    h = spatial(**spatial_kw(heads[i]), ttm=level is not None, cfg=c,
                                name=f"{p}_attentions_{j}")(h, ctx, ttm_in.get(level))
                h = motion(**motion_kw(mheads[i], c.temporal_transformer_layers_per_block),
                           name=f"{p}_motion_modules_{j}")(h, t)
                skips.append(h)
            if i < n_levels - 1:
                h = _conv(chans[i], 3, stride=2, name=f"{p}_downsamplers_0_conv", **kw)(h)
                skips.append(h)

        p = "mid_block"
        h = resnet(chans[-1], output_scale_factor=c.mid_block_scale_factor, **res_kw, name=f"{p}_resnets_0")(h, temb)
        for j in range(c.mid_block_layers):
            h = spatial(**spatial_kw(heads[-1]), name=f"{p}_attentions_{j}")(h, ctx)
            if c.use_motion_mid_block:
                h = motion(**motion_kw(mheads[-1], c.temporal_transformer_layers_per_mid_block),
                           name=f"{p}_motion_modules_{j}")(h, t)
            h = resnet(chans[-1], output_scale_factor=c.mid_block_scale_factor, **res_kw,
                       name=f"{p}_resnets_{j + 1}")(h, temb)

        rchans, rheads, rmheads = chans[::-1], heads[::-1], mheads[::-1]
        for i, kind in enumerate(c.up_block_types):
            p = f"up_blocks_{i}"
            for j in range(c.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(rchans[i], **res_kw, name=f"{p}_resnets_{j}")(h, temb)
                if kind == CROSS_UP:
                    h = spatial(**spatial_kw(rheads[i]), name=f"{p}_attentions_{j}")(h, ctx)
                h = motion(**motion_kw(rmheads[i], c.temporal_transformer_layers_per_block),
                           name=f"{p}_motion_modules_{j}")(h, t)
            if i < n_levels - 1:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest 2x
                h = _conv(rchans[i], 3, name=f"{p}_upsamplers_0_conv", **kw)(h)

        h = nn.silu(norms.GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(h))
        h = _conv(self.out_channels, 3, name="conv_out", axes=(None, None, "embed", "out_channels"), **kw)(h)
        return h.reshape(b, t, hh, ww, self.out_channels).astype(jnp.float32)

    def _ttm_inputs(self, c: UNetConfig, t: int, hh: int, ww: int, local_context: jax.Array | None,
                    token_ids: jax.Array | None, cross_token_ids: jax.Array | None,
                    local_ids: jax.Array | None) -> dict[int, TTMInputs]:
        """{level: TTMInputs} for every TTM level, cut out of the concatenated ids and laid out per frame."""
        if not c.ttm_layers:
            return {}
        b = local_context.shape[0]
        lc = jnp.repeat(local_context.astype(c.compute_dtype), t, axis=0)
        lids = None if local_ids is None else jnp.repeat(local_ids, t, axis=0)
        out = {}
        for level, (off, n) in c.ttm_tokens(t, hh, ww).items():
            hw = n // t
            self_ids = cross = None
            if c.mask_self:
                self_ids = token_ids[:, off:off + n]
                if not c.ttm_self_across_frames:
                    self_ids = self_ids.reshape(b * t, hw)
                if c.attention_sparse:  # sorted once per level; every masked layer there reuses it
                    self_ids = sparse_attention.sort_objects(self_ids, impl=c.attention)
            if c.mask_cross:
                cross = cross_token_ids[:, off:off + n].reshape(b * t, hw)
            out[level] = TTMInputs(t, lc, self_ids, cross, lids)
        return out

    def _check_inputs(self, c: UNetConfig, x: jax.Array, timestep: jax.Array, context: jax.Array,
                      local_context: jax.Array | None, token_ids: jax.Array | None,
                      cross_token_ids: jax.Array | None, local_ids: jax.Array | None) -> tuple[int, int, int, int]:
        """Raises a ValueError naming the argument and the fix; returns (B, T, H, W)."""
        where = "ttm_jax/backbones/animatediff/model.py: UNet"
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{where}: x must be [B, T, H, W, in_channels={self.in_channels}], got {x.shape}")
        b, t, hh, ww, _ = x.shape
        if hh % c.downscale or ww % c.downscale:
            raise ValueError(f"{where}: latent H x W = {hh} x {ww} must be multiples of {c.downscale} (one halving "
                             f"per level of config.model.block_out_channels but the last); change data.height/width")
        if t > c.motion_max_seq_length:
            raise ValueError(f"{where}: {t} latent frames exceed config.model.motion_max_seq_length="
                             f"{c.motion_max_seq_length} (the motion modules' frame embedding)")
        if timestep.shape != (b,):
            raise ValueError(f"{where}: timestep must be [B] = ({b},), got {timestep.shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != c.cross_attention_dim:
            raise ValueError(f"{where}: context must be [B={b}, L, cross_attention_dim={c.cross_attention_dim}], "
                             f"got {context.shape} (config.model.cross_attention_dim must equal the text width)")
        if not c.ttm_layers:
            return b, t, hh, ww
        if local_context is None or local_context.ndim != 3 or local_context.shape[0] != b:
            raise ValueError(f"{where}: config.model.ttm_layers={c.ttm_layers} needs local_context [B={b}, S*Lp, "
                             f"{c.cross_attention_dim}] (the local prompts' embeddings, slot 0 = caption), got "
                             f"{None if local_context is None else local_context.shape}; ttm_layers=0 has none")
        ll = local_context.shape[1]
        n = sum(n for _, n in c.ttm_tokens(t, hh, ww).values())
        needed = [("token_ids", token_ids, n)] if c.mask_self else []
        if c.mask_cross:
            needed += [("cross_token_ids", cross_token_ids, n), ("local_ids", local_ids, ll)]
        for name, ids, length in needed:
            if ids is None or ids.shape != (b, length):
                raise ValueError(f"{where}: {name} must be int32 [B, {length}] = {(b, length)} (the U-Net's "
                                 f"layout: TTM levels {c.ttm_levels()} concatenated, unet.object_ids builds it), "
                                 f"got {None if ids is None else ids.shape}; ttm_masked=False needs none")
        return b, t, hh, ww


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and ids


def object_ids(cfg: UNetConfig, object_masks: jax.Array, *, time_factor: int, space_factor: int,
               cross_from_boxes: bool = True) -> tuple[jax.Array, jax.Array]:
    """`(token_ids, cross_token_ids)` int32 `[B, N]` in the U-Net's layout: for each TTM level l (ascending), the ids
    of the latent grid at `H / 2^l` (`masks.token_ids_from_masks` with `space_factor * 2^l`, patch 1), `(t, h, w)`
    row-major, concatenated. object_masks bool `[B, T, H, W, K]` (pixels); the cross ids from boxes
    (`masks.token_ids_from_boxes`) when `cross_from_boxes`, else from the masks."""
    self_parts, cross_parts = [], []
    for level in cfg.ttm_levels():
        geo = dict(time_factor=time_factor, space_factor=space_factor * 2**level, patch_size=(1, 1, 1))
        self_parts.append(masks.token_ids_from_masks(object_masks, **geo))
        by = masks.token_ids_from_boxes if cross_from_boxes else masks.token_ids_from_masks
        cross_parts.append(by(object_masks, **geo))
    if not self_parts:
        raise ValueError("unet.object_ids: config.model.ttm_layers=0 has no TTM levels (no ids to build)")
    return jnp.concatenate(self_parts, axis=1), jnp.concatenate(cross_parts, axis=1)


def init_inputs(cfg: UNetConfig, in_channels: int, *, batch: int = 1, grid: tuple[int, int, int] | None = None,
                text_len: int = 1, local_len: int = 1, abstract: bool = False
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`(args, kwargs)` for `UNet.init` / `UNet.apply`: x `[B, T, H, W, in_channels]`, timestep `[B]`, context
    `[B, text_len, cross_attention_dim]`; with TTM layers local_context `[B, local_len, cross_attention_dim]`,
    token_ids / cross_token_ids `[B, N]` (U-Net layout), local_ids `[B, local_len]`. `grid` = latent `(T, H, W)`;
    default one frame of `downscale x downscale`, the smallest input that builds every parameter (parameter shapes
    depend on neither the grid nor the text lengths). `abstract`: `jax.ShapeDtypeStruct`s instead of zeros."""
    t, h, w = grid if grid is not None else (1, cfg.downscale, cfg.downscale)

    def make(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype) if abstract else jnp.zeros(shape, dtype)

    f32, i32 = jnp.float32, jnp.int32
    d = cfg.cross_attention_dim
    args = (make((batch, t, h, w, in_channels), f32), make((batch,), f32), make((batch, text_len, d), f32))
    kwargs: dict[str, Any] = {}
    if cfg.ttm_layers:
        n = sum(n for _, n in cfg.ttm_tokens(t, h, w).values())
        kwargs = dict(local_context=make((batch, local_len, d), f32), token_ids=make((batch, n), i32),
                      cross_token_ids=make((batch, n), i32), local_ids=make((batch, local_len), i32))
    return args, kwargs


# ---------------------------------------------------------------------------------------------------------------------
# Parameter surgery (unboxed trees: plain arrays; use `nn.unbox` first)


def _is_ttm(path: tuple[str, ...]) -> bool:
    return any(part in TTM_MODULES for part in path)


def expand_input_channels(params: Mapping, in_channels: int) -> dict:
    """Widens `conv_in/kernel [3, 3, C, C0]` to `in_channels`, the new channels zero: a backbone with C latent
    inputs then sees only the first C channels (the noisy latent, as `conditioning.stage_input` orders them) and
    computes what it did before. Other leaves are returned as they are."""
    return layers.widen_input_channels(params, ("conv_in", "kernel"), in_channels, where="unet.expand_input_channels")


def graft_backbone(params: Mapping, backbone: Mapping) -> dict:
    """A stage U-Net's params whose backbone is `backbone` and whose TTM layers stay as in `params`.

    params: a fresh (unboxed) init of the U-Net with TTM layers and the stage's `in_channels`; backbone: (unboxed)
    params of the same config with `ttm_layers=0` (e.g. converted AnimateDiff weights,
    `ttm_jax/backbones/animatediff/weights.py`), whose
    `conv_in` may have fewer input channels (zero-padded here). Every leaf outside `masked_self_attn` /
    `masked_cross_attn` must come from `backbone` with its shape, or this raises naming it. Since the TTM layers'
    output projections start at zero, the result computes exactly what the backbone does.
    """
    fresh = traverse_util.flatten_dict(dict(params))
    in_channels = fresh[("conv_in", "kernel")].shape[2]
    back = traverse_util.flatten_dict(expand_input_channels(backbone, in_channels))
    out = dict(fresh)
    for key, value in back.items():
        if key not in fresh:
            raise KeyError(f"unet.graft_backbone: backbone leaf {'/'.join(key)} has no place in the stage model; "
                           f"was the backbone built with the same config.model (block_out_channels, layers, ...)?")
        if tuple(fresh[key].shape) != tuple(np.shape(value)):
            raise ValueError(f"unet.graft_backbone: {'/'.join(key)} is {tuple(fresh[key].shape)} in the stage model "
                             f"but {tuple(np.shape(value))} in the backbone; check config.model against the "
                             f"converted checkpoint")
        out[key] = jnp.asarray(value, fresh[key].dtype)
    left = [k for k in fresh if k not in back and not _is_ttm(k)]
    if left:
        raise KeyError(f"unet.graft_backbone: backbone lacks {['/'.join(k) for k in left[:5]]} ({len(left)} "
                       f"leaves); was it converted with the same config.model?")
    return traverse_util.unflatten_dict(out)
