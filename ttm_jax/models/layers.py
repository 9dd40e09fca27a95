"""Generic building blocks of the Wan 2.1-layout video DiT (`ttm_jax/backbones/wan/model.py`), in Flax Linen: dense
layers with logical axes, norms, 3D RoPE, timestep embedding, FFN and attention. TTM's added masked layers, built from
these,
are in `ttm_jax/models/ttm_layers.py`.

Each module is named for what it is and keeps diffusers' `WanTransformer3DModel` parameter names where there is one
(`to_q`, `norm_q`, `linear_1`, ...), so that the conversion rulebook (`ttm_jax/weights/`) is a table of renames and
transposes. Norms, RoPE and the AdaLN modulation run in float32 whatever the compute dtype, as Wan does.

Logical axis names (CONTRIBUTING.md): parameters use `embed`, `heads` (fused heads x head_dim), `mlp`, `text_embed`,
`in_channels`, `out_channels`, `modulation`; activations `batch`, `length`, `kv_length`, `embed`, `heads`, `mlp`.
Square `[dim, dim]` kernels outside attention get one named axis only (`None, "embed"`), since one logical name
may not appear twice in a parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ttm_jax.models import attention as attention_ops
from ttm_jax.models import context_parallel, masks, sparse_attention
from ttm_jax.models.norms import RMSNorm as RMSNorm  # the one RMSNorm (`norms.py`), here for the DiT and TTM layers

Dtype = Any
Axes = tuple[str | None, ...]


def logical_init(init: nn.initializers.Initializer, axes: Axes) -> nn.initializers.Initializer:
    """`init` with logical axis names attached (`nn.with_logical_partitioning`)."""
    return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """`nn.with_logical_constraint`; a no-op outside `nn.logical_axis_rules` (CPU tests)."""
    return nn.with_logical_constraint(x, axes)


def dense(features: int, axes: Axes, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None,
          zero_init: bool = False, use_bias: bool = True) -> nn.Dense:
    """`nn.Dense` with logical names on kernel `[in, out]` (`axes`) and bias `[out]` (`axes[-1:]`).

    `zero_init` zeroes kernel and bias: the added TTM output projections start as the identity residual.
    """
    kinit = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=logical_init(kinit, axes),
                    bias_init=logical_init(nn.initializers.zeros_init(), axes[-1:]), name=name)


# ---------------------------------------------------------------------------------------------------------------------
# Norms


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, always computed in float32 (diffusers' `FP32LayerNorm`); output float32.

    `affine=False` has no parameters (Wan's norm1/norm3/norm_out, whose scale and shift come from the timestep);
    `affine=True` has `scale`, `bias` `[features]` (Wan's norm2 and TTM's added norms).
    """

    eps: float = 1e-6
    affine: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            d = x.shape[-1]
            scale = self.param("scale", logical_init(nn.initializers.ones_init(), ("embed",)), (d,),
                               self.param_dtype)
            bias = self.param("bias", logical_init(nn.initializers.zeros_init(), ("embed",)), (d,),
                              self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y


# ---------------------------------------------------------------------------------------------------------------------
# Positions and timesteps


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of `head_dim` into (t, h, w) RoPE sub-dimensions: h = w = 2 * (head_dim // 6), t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _rope_table(dim: int, length: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 `[length, dim]` of positions 0..length-1, each frequency repeated for its (even, odd) pair.

    Computed in float64 (as diffusers) and rounded once, so long sequences keep exact angles.
    """
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]
    angles = np.outer(np.arange(length, dtype=np.float64), freqs)  # [length, dim/2]
    cos = np.repeat(np.cos(angles), 2, axis=1).astype(np.float32)
    sin = np.repeat(np.sin(angles), 2, axis=1).astype(np.float32)
    return cos, sin


def rope_3d(head_dim: int, grid: Sequence[int], max_seq_len: int = 1024,
            theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """3D rotary tables for a `(t, h, w)` token grid: cos, sin float32 `[N, head_dim]`, N = t*h*w, `(t, h, w)` order.

    The head dim is split `rope_split(head_dim)`; each part rotates by the token's frame, row or column index.
    Built from three small per-axis tables, broadcast on device (no `[N, head_dim]` constant in the program).
    """
    f, h, w = (int(g) for g in grid)
    if max(f, h, w) > max_seq_len:
        raise ValueError(f"layers.rope_3d: token grid {(f, h, w)} exceeds config.model.rope_max_seq_len="
                         f"{max_seq_len}; raise it or use a smaller latent")
    dt, dh, dw = rope_split(head_dim)
    parts_cos, parts_sin = [], []
    for dim, n, shape in ((dt, f, (f, 1, 1)), (dh, h, (1, h, 1)), (dw, w, (1, 1, w))):
        c, s = _rope_table(dim, n, theta)
        parts_cos.append(jnp.broadcast_to(jnp.asarray(c).reshape(*shape, dim), (f, h, w, dim)))
        parts_sin.append(jnp.broadcast_to(jnp.asarray(s).reshape(*shape, dim), (f, h, w, dim)))
    cos = jnp.concatenate(parts_cos, axis=-1).reshape(f * h * w, head_dim)
    sin = jnp.concatenate(parts_sin, axis=-1).reshape(f * h * w, head_dim)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs `(x[2i], x[2i+1])` of x `[B, N, H, D]` by tables `[N, D]`; float32 math, x's dtype."""
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    c = cos[None, :, None, 0::2]
    s = sin[None, :, None, 0::2]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding float32 `[B, dim]` of timesteps `[B]` (Wan units, 0..1000): `[cos, sin]` halves.

    diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`: frequency i is `max_period^(-i/(dim/2))`.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Embedders


class TimestepEmbedder(nn.Module):
    """`linear_1 -> SiLU -> linear_2`: sinusoid `[B, freq_dim]` -> `[B, dim]` (diffusers' `TimestepEmbedding`)."""

    dim: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 compute, as diffusers keeps `time_embedder` in fp32 (`_keep_in_fp32_modules`).
        kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype)
        x = dense(self.dim, (None, "embed"), name="linear_1", **kw)(x)
        return dense(self.dim, (None, "embed"), name="linear_2", **kw)(nn.silu(x))


class TextProjection(nn.Module):
    """`linear_1 -> GELU(tanh) -> linear_2`: text `[B, L, text_dim]` -> `[B, L, dim]` (diffusers' PixArt projection)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.dim, ("text_embed", "embed"), name="linear_1", **kw)(x)
        x = nn.gelu(x, approximate=True)
        return dense(self.dim, (None, "embed"), name="linear_2", **kw)(x)


class FeedForward(nn.Module):
    """`proj_in -> GELU(tanh) -> proj_out`, `[B, N, dim]` -> same (diffusers' `ffn.net.0.proj`, `ffn.net.2`)."""

    dim: int
    ffn_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.ffn_dim, ("embed", "mlp"), name="proj_in", **kw)(x)
        h = constrain(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        return dense(self.dim, ("mlp", "embed"), name="proj_out", **kw)(h)


# ---------------------------------------------------------------------------------------------------------------------
# Attention


_MASKED = -0.7 * float(np.finfo(np.float32).max)


def _masked_logits(s: jax.Array, allowed: jax.Array | None) -> jax.Array:
    """Logits f32 (`[B, H, Lq, Lk]`, or transposed) with the pairs `allowed` (bool, broadcastable to `s`; None: all)
    forbids set to `jax.nn.dot_product_attention`'s large finite negative (a fully masked row averages uniformly
    instead of giving NaN, as the `xla` reference)."""
    if allowed is None:
        return s
    return jnp.where(allowed, s, jnp.asarray(_MASKED, s.dtype))


def _attend_fwd(q: jax.Array, k: jax.Array, v: jax.Array, ids: tuple, scale: float
                ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    # q, k, v [B, H, L, D] (q already scaled); logits and softmax in f32, P cast to v's dtype for P @ V
    allowed = masks.allowed(*ids)[:, None] if ids else None  # [B, 1, Lq, Lk]
    s = _masked_logits(jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32), allowed)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    return o.astype(v.dtype), m + jnp.log(denom)  # the log-sum-exp [B, H, Lq, 1]: the one softmax residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q: jax.Array, k: jax.Array, v: jax.Array, ids: tuple, scale: float) -> jax.Array:
    return _attend_fwd(q, k, v, ids, scale)[0]


def _attend_vjp_fwd(q, k, v, ids, scale):
    o, stats = _attend_fwd(q, k, v, ids, scale)
    return o, (q, k, v, ids, o, stats)


def _attend_vjp_bwd(scale, res, do):
    # Recomputes the probabilities from the saved log-sum-exp (flash-attention style: only O(L) residuals live between
    # the passes), transposed: P^T `[B, H, Lk, Lq]` = exp(K Q^T - lse^T). Then dV = P^T dO and dK = dS^T Q are plain
    # `A @ B` GEMMs and dP^T = V dO^T an `A @ B^T`, the two forms XLA's CPU backend hands to its GEMM library; the
    # untransposed form needs `P^T dO`, a dot contracting the lhs's second-to-last dimension, which it runs on a slower
    # path. dQ = dS K takes the transpose of dS^T (XLA folds it into that dot, which stays on the slower path).
    q, k, v, ids, o, lse = res
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, Lq, 1]
    delta_t, lse_t = jnp.swapaxes(delta, -1, -2), jnp.swapaxes(lse, -1, -2)  # [B, H, 1, Lq]
    # Tie the recomputation to the incoming gradient (q + 0 * delta): with no data dependency on it, XLA's CPU
    # scheduler computes every layer's recomputed [B, H, Lk, Lq] probabilities as soon as the forward has made the
    # residuals, all alive at once at the start of the backward pass (it drops optimization barriers; 0 * x is not
    # folded for floats). A non-finite gradient makes the step's gradients non-finite either way.
    q = q + (delta * 0).astype(q.dtype)
    allowed_t = jnp.swapaxes(masks.allowed(*ids), -1, -2)[:, None] if ids else None  # [B, 1, Lk, Lq]
    s_t = _masked_logits(jnp.einsum("bhkd,bhqd->bhkq", k, q, preferred_element_type=jnp.float32), allowed_t)
    p_t = jnp.exp(s_t - lse_t)
    if ids:
        # a fully masked row: lse = mask value + log(Lk) rounds to the mask value, so p would be 1, not 1 / Lk
        p_t = jnp.where(lse_t < 0.5 * _MASKED, 1.0 / s_t.shape[-2], p_t)
    dv = jnp.einsum("bhkq,bhqd->bhkd", p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp_t = jnp.einsum("bhkd,bhqd->bhkq", v, do, preferred_element_type=jnp.float32)
    ds_t = p_t * (dp_t - delta_t)
    if ids:  # no gradient through masked logits (it matters in a fully masked row, where p is 1 / Lk)
        ds_t = jnp.where(allowed_t, ds_t, 0.0)
    ds_t = ds_t.astype(q.dtype)
    dk = jnp.einsum("bhkq,bhqd->bhkd", ds_t, q, preferred_element_type=jnp.float32)
    dq = jnp.einsum("bhqk,bhkd->bhqd", jnp.swapaxes(ds_t, -1, -2), k, preferred_element_type=jnp.float32)
    ids_ct = jax.tree.map(lambda i: np.zeros(i.shape, jax.dtypes.float0), ids)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), ids_ct


_attend.defvjp(_attend_vjp_fwd, _attend_vjp_bwd)


def gradient_barrier(x: jax.Array) -> jax.Array:
    """The identity, whose backward on the CPU backend writes the incoming gradient out once before passing it on
    (elsewhere: the identity). Put on the residual stream where several sub-layers read it: the stream's gradient is
    a running sum over every later sub-layer, and without the barrier XLA's CPU fusion re-evaluates that whole sum
    inside each consumer of it (each LayerNorm backward, each weight gradient's transposed operand), work that grows
    with the square of the depth. With it the sum is written once per sub-layer, as PyTorch's autograd does. Values and
    finite gradients are unchanged (an infinite gradient element becomes NaN)."""
    return _cpu_gradient_barrier(x) if jax.default_backend() == "cpu" else x


@jax.custom_vjp
def _cpu_gradient_barrier(x: jax.Array) -> jax.Array:
    return x


def _gradient_barrier_fwd(x):
    return x, None


def _gradient_barrier_bwd(_, g):
    # XLA's CPU pipeline removes optimization barriers before fusion, so the barrier is an exact division by ones it
    # cannot fold (1 + 0 * g: 0 * x is not folded for floats; a broadcast scalar would become a multiply by its
    # reciprocal): a divide is "expensive" to XLA's fusion, which does not duplicate an expensive producer into
    # several consumers, so the gradient is computed once.
    g32 = g.astype(jnp.float32)
    return ((g32 / (1.0 + 0.0 * g32)).astype(g.dtype),)


_cpu_gradient_barrier.defvjp(_gradient_barrier_fwd, _gradient_barrier_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, q_ids: jax.Array | None = None,
                    kv_ids: jax.Array | None = None) -> jax.Array:
    """Exact softmax attention whose backward recomputes the probabilities (the `xla` reference's semantics and
    masks: query i sees key j iff `q_ids[i] == kv_ids[j] >= 0`; `kv_ids=None` with `q_ids`: self-attention).

    q `[B, Lq, H, D]`, k / v `[B, Lk, H, D]` -> `[B, Lq, H, D]`. Heads-major `[B, H, L, D]` inside, so every matmul
    is a plain batched GEMM; between the forward and backward passes only q, k, v, the output and the per-row
    log-sum-exp are kept (autodiff of `jax.nn.dot_product_attention` keeps `[B, H, Lq, Lk]` logits and
    probabilities per layer). What `Attention` runs for `impl="xla"` on CPU (`use_fused_attention`).
    """
    if q_ids is not None and kv_ids is None:
        kv_ids = q_ids
    ids = () if q_ids is None else (jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32))
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = _attend((qt.astype(jnp.float32) * scale).astype(q.dtype), kt, vt, ids, float(scale))
    return out.transpose(0, 2, 1, 3)


def widen_input_channels(params: Mapping, key: tuple[str, ...], in_channels: int, *, where: str) -> dict:
    """`params` (unboxed) with the conv kernel at `key` (`[..., C, D]`: input channels second to last) zero-padded to
    `in_channels` inputs: the first C inputs keep their weights, the new ones start at zero, so the model computes
    what it did on its first C channels. Other leaves are returned as they are. `where` names the caller in errors."""
    flat = traverse_util.flatten_dict(dict(params))
    if key not in flat:
        raise KeyError(f"{where}: params have no {'/'.join(key)}; pass the model's 'params' collection (unboxed)")
    kernel = jnp.asarray(flat[key])
    have = kernel.shape[-2]
    if in_channels < have:
        raise ValueError(f"{where}: {'/'.join(key[:-1])} has {have} input channels, more than "
                         f"in_channels={in_channels}")
    pad = [(0, 0)] * kernel.ndim
    pad[-2] = (0, in_channels - have)
    flat[key] = jnp.pad(kernel, pad)
    return traverse_util.unflatten_dict(flat)


def use_fused_attention(impl: str, q_ids: Any) -> bool:
    """Whether `Attention` runs `fused_attention`: impl "xla" on the CPU backend with dense (or no) ids. Elsewhere
    `attention.dot_product_attention` (cuDNN / Pallas / XLA on GPU and TPU; the object-sparse path for an
    `ObjectSort`)."""
    return (impl == "xla" and jax.default_backend() == "cpu"
            and not isinstance(q_ids, sparse_attention.ObjectSort))


def context_size(axis: str = "context") -> int:
    """The size of mesh axis `axis` (config.mesh.context) of the mesh in scope (`jax.set_mesh`); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return int(mesh.shape[axis])


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, context_impl: str, cross: bool,
                      scale: float, q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None) -> jax.Array:
    """Attention with the video tokens sharded over the mesh's `context` axis (`ttm_jax/models/context_parallel.py`):
    self-attention by `context_impl` (`CONTEXT_IMPLS`: ulysses | ring), cross-attention (`cross`) with the queries
    sharded and the keys, values and kv_ids replicated. q `[B, Lq, H, D]`, k / v `[B, Lk, H, D]`, ids int32 or None
    as `fused_attention` -> `[B, Lq, H, D]`.

    The per-shard op (Ulysses' head groups, the cross-attention's shards) is `fused_attention` where `Attention` would
    run it (impl xla on CPU), else `context_parallel.local_attention` (exact XLA attention): the Pallas kernels
    (`gpu`, `splash`) shard themselves over the mesh and cannot run inside the context shard_map. q_ids an
    `ObjectSort` (`config.model.attention_sparse`): the object-sparse block loop per shard (Ulysses: on the DiT's
    sort of all the tokens; ring: each shard sorts its own).
    """
    attend = fused_attention if use_fused_attention(impl, q_ids) else context_parallel.local_attention
    if cross:
        return context_parallel.sharded_cross_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, scale=scale,
                                                        attend=attend)
    if context_impl not in context_parallel.CONTEXT_IMPLS:
        raise ValueError(f"layers.context_attention: config.model.context_impl={context_impl!r}; choose one of "
                         f"{tuple(context_parallel.CONTEXT_IMPLS)}")
    kw = {"attend": attend} if context_impl == "ulysses" else {}
    return context_parallel.CONTEXT_IMPLS[context_impl](q, k, v, q_ids=q_ids, kv_ids=kv_ids, scale=scale, **kw)


class Attention(nn.Module):
    """Wan attention: `to_q/to_k/to_v` -> RMS-norm of q and k across heads -> RoPE (self) -> attention -> `to_out`.

    x `[B, N, dim]`; `context` `[B, Lk, dim]` (already projected to `dim`) or None for self-attention; rope tables
    `[N, head_dim]` or None; ids int32 `[B, N]` / `[B, Lk]` or None (unmasked), passed to
    `ttm_jax.models.attention.dot_product_attention` with `impl`. `zero_init_out` zeroes `to_out` (TTM's added layers
    start as no-ops). Returns `[B, N, dim]` in `dtype`.

    `context_impl` (ulysses | ring; config.model.context_impl): under a mesh whose `context` axis is > 1 the tokens x
    are split over it and the attention runs by `context_attention`. None (the default): the attention above whatever
    the mesh (XLA gathers a sharded sequence itself).
    """

    dim: int
    num_heads: int
    eps: float = 1e-6
    qk_norm: bool = True
    impl: str = "xla"
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    context_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope: tuple[jax.Array, jax.Array] | None = None,
                 q_ids: jax.Array | None = None, kv_ids: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self_attention = context is None
        kv_in = x if self_attention else context
        kv_axes = ("batch", "length", "heads") if self_attention else ("batch", "kv_length", "heads")
        q = constrain(dense(self.dim, ("embed", "heads"), name="to_q", **kw)(x), ("batch", "length", "heads"))
        k = constrain(dense(self.dim, ("embed", "heads"), name="to_k", **kw)(kv_in), kv_axes)
        v = constrain(dense(self.dim, ("embed", "heads"), name="to_v", **kw)(kv_in), kv_axes)
        if self.qk_norm:
            q = RMSNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_q")(q)
            k = RMSNorm(self.eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm_k")(k)
        head_dim = self.dim // self.num_heads
        q = q.reshape(*q.shape[:2], self.num_heads, head_dim)
        k = k.reshape(*k.shape[:2], self.num_heads, head_dim)
        v = v.reshape(*v.shape[:2], self.num_heads, head_dim)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        if self.context_impl is not None and context_size() > 1:
            out = context_attention(q, k, v, impl=self.impl, context_impl=self.context_impl,
                                    cross=not self_attention, scale=head_dim**-0.5, q_ids=q_ids, kv_ids=kv_ids)
        elif use_fused_attention(self.impl, q_ids):
            out = fused_attention(q, k, v, scale=head_dim**-0.5, q_ids=q_ids, kv_ids=kv_ids)
        else:
            out = attention_ops.dot_product_attention(q, k, v, q_ids=q_ids, kv_ids=kv_ids, impl=self.impl,
                                                      scale=head_dim**-0.5)
        out = constrain(out.reshape(*out.shape[:2], self.dim), ("batch", "length", "heads"))
        return dense(self.dim, ("heads", "embed"), name="to_out", zero_init=self.zero_init_out, **kw)(out)
