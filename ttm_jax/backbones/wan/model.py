"""The TTM video DiT: Wan 2.1's `WanTransformer3DModel` layout in Flax Linen, plus TTM's masked layers.

Forward, for x `[B, T', H', W', in_channels]` (the noisy latent channel-concatenated with its conditions,
`conditioning.stage_input`), timestep `[B]` in Wan units (0..1000) and caption embeddings `[B, Lc, text_dim]`:

  patch_embedding (Conv3d, kernel = stride = patch_size) -> tokens `[B, N, dim]`, `N = T'/pt * H'/ph * W'/pw`,
      ordered `(t, h, w)`; 3D RoPE tables from the token grid (`layers.rope_3d`)
  condition_embedder: sinusoid(timestep) -> time_embedder -> temb `[B, dim]`; time_proj(SiLU(temb)) -> `[B, 6, dim]`;
      text_embedder(caption) and text_embedder(local prompts) -> `[B, L, dim]` (one projection for both)
  num_layers x block:
      x += gate * attn1(norm1(x) * (1 + scale) + shift)                 self-attention, RoPE, q/k RMS-norm
      x  = masked_self_attn(x)                     [first ttm_layers]   TTM: same-object tokens only
      x += attn2(norm2(x), caption)                                     cross-attention to the caption
      x  = masked_cross_attn(x, local prompts)     [first ttm_layers]   TTM: own object's local prompt only
      x += c_gate * ffn(norm3(x) * (1 + c_scale) + c_shift)
    with (shift, scale, gate, c_shift, c_scale, c_gate) = block.scale_shift_table + time_proj output
  norm_out(x) * (1 + scale) + shift, (shift, scale) = scale_shift_table + temb -> proj_out -> unpatchify
  -> `[B, T', H', W', out_channels]` float32.

Masking switches (the paper's Table 3 rows): `ttm_masked=False` keeps the added layers but drops both masks ("no
masked attention"); `ttm_masked_self=False` / `ttm_masked_cross=False` drop one ("masked cross-attention only" /
"masked self-attention only"). The single-stage TI2V baseline is stage 0 (`configs/ti2v.py`): no trajectory input,
the added layers unmasked.

Context parallelism: under a mesh whose `context` axis is > 1 (`config.mesh.context`) the tokens, their object ids and
the RoPE tables are split over it (the `length` logical rule) and every attention runs by `layers.context_attention`
(`config.model.context_impl`: ulysses | ring for self-attention; cross-attention with the text replicated).

Parameter tree (unboxed; `D = dim`, `F = ffn_dim`, `Tx = text_dim`, `P = pt*ph*pw`; Dense kernels are `[in, out]`,
i.e. the transpose of torch's `weight`; norm weights are `scale`):

  patch_embedding/kernel                      [pt, ph, pw, in_channels, D]   torch Conv3d weight permuted (2,3,4,1,0)
  patch_embedding/bias                        [D]
  condition_embedder/time_embedder/linear_1   kernel [freq_dim, D], bias [D]
  condition_embedder/time_embedder/linear_2   kernel [D, D], bias [D]
  condition_embedder/time_proj                kernel [D, 6D], bias [6D]
  condition_embedder/text_embedder/linear_1   kernel [Tx, D], bias [D]
  condition_embedder/text_embedder/linear_2   kernel [D, D], bias [D]
  <block>/scale_shift_table                   [1, 6, D]
  <block>/attn1/{to_q,to_k,to_v,to_out}       kernel [D, D], bias [D]   (diffusers `to_out.0`)
  <block>/attn1/{norm_q,norm_k}/scale         [D]                       (when qk_norm)
  <block>/norm2/{scale,bias}                  [D]                       (when cross_attn_norm)
  <block>/attn2/...                           as attn1
  <block>/ffn/proj_in                         kernel [D, F], bias [F]  (diffusers `ffn.net.0.proj`)
  <block>/ffn/proj_out                        kernel [F, D], bias [D]  (diffusers `ffn.net.2`)
  <ttm block>/masked_self_attn/norm/{scale,bias}   [D]                 TTM only, no diffusers counterpart
  <ttm block>/masked_self_attn/attn/...            as attn1 (to_out zero-initialised)
  <ttm block>/masked_cross_attn/norm/{scale,bias}  [D]
  <ttm block>/masked_cross_attn/attn/...           as attn2 (to_out zero-initialised)
  scale_shift_table                           [1, 2, D]
  proj_out                                    kernel [D, P * out_channels], bias [P * out_channels]
      (output features ordered (pt, ph, pw, out_channels), as diffusers)

Blocks: with `scan_layers=False`, `blocks_0 .. blocks_{L-1}` (diffusers `blocks.i`; the first `ttm_layers` carry the
TTM layers). With `scan_layers=True`, two stacks whose every leaf has a leading `layers` axis: `ttm_blocks`
(diffusers blocks `0 .. K-1`, K = ttm_layers, absent when K = 0) and `blocks` (diffusers blocks `K .. L-1`, absent
when K = L). `scan_layout` / `unscan_layout` convert between the two.

Params carry logical axis names (`nn.with_logical_partitioning`; `nn.unbox` / `nn.get_partition_spec` them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ttm_jax.models import layers, remat, sparse_attention, ttm_layers

TTM_MODULES = ttm_layers.TTM_MODULES


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The model fields `DiT` reads, frozen (hashable for Flax transforms); `from_config(config.model)` builds it."""

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    text_dim: int
    freq_dim: int
    ttm_layers: int = 0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_max_seq_len: int = 1024
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    ttm_masked: bool = True
    ttm_masked_self: bool = True
    ttm_masked_cross: bool = True
    attention: str = "xla"
    attention_sparse: bool = False
    context_impl: str = "ulysses"
    scan_layers: bool = True
    scan_unroll: int = 0
    remat_policy: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Any) -> DiTConfig:
        """From `config.model` (a ConfigDict or mapping) or a `DiTConfig`; unknown keys are ignored."""
        if isinstance(config, cls):
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        items = dict(config.items()) if hasattr(config, "items") else dict(vars(config))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in items]
        if missing:
            raise ValueError(f"dit.DiTConfig: config.model lacks {missing}; see ttm_jax/config.py:_model")
        kw = {k: v for k, v in items.items() if k in names}
        if "patch_size" in kw:
            kw["patch_size"] = tuple(int(p) for p in kw["patch_size"])
        return cls(**kw)

    @property
    def mask_self(self) -> bool:
        """Whether the added self-attention is masked (`ttm_masked` and `ttm_masked_self`)."""
        return bool(self.ttm_masked and self.ttm_masked_self)

    @property
    def mask_cross(self) -> bool:
        """Whether the added cross-attention is masked (`ttm_masked` and `ttm_masked_cross`)."""
        return bool(self.ttm_masked and self.ttm_masked_cross)

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"dit.DiTConfig: config.model.{field}: {msg}")

        need(self.dim % self.num_heads == 0, "dim", f"{self.dim} not divisible by num_heads={self.num_heads}")
        hd = self.dim // self.num_heads
        need(hd % 2 == 0 and hd >= 6, "num_heads", f"head dim {hd} must be even and >= 6 for 3D RoPE")
        need(0 <= self.ttm_layers <= self.num_layers, "ttm_layers",
             f"{self.ttm_layers} must be in [0, num_layers={self.num_layers}]")
        need(self.remat_policy == "none" or self.remat_policy in remat.POLICIES, "remat_policy",
             f"{self.remat_policy!r}; choose none or one of {sorted(remat.POLICIES)}")
        need(isinstance(self.scan_unroll, int) and self.scan_unroll >= 0, "scan_unroll",
             f"{self.scan_unroll!r} must be an int >= 0 (0: per backend, see dit.unroll_for)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)


class ConditionEmbedder(nn.Module):
    """timestep `[B]` -> (temb `[B, D]` f32, modulation `[B, 6, D]` f32); text `[B, L, text_dim]` -> `[B, L, D]`."""

    cfg: DiTConfig

    def setup(self) -> None:
        c = self.cfg
        self.time_embedder = layers.TimestepEmbedder(c.dim, param_dtype=c.weight_dtype)
        self.time_proj = layers.dense(6 * c.dim, ("embed", "modulation"), dtype=c.compute_dtype,
                                      param_dtype=c.weight_dtype)
        self.text_embedder = layers.TextProjection(c.dim, dtype=c.compute_dtype, param_dtype=c.weight_dtype)

    def time(self, timestep: jax.Array) -> tuple[jax.Array, jax.Array]:
        temb = self.time_embedder(layers.timestep_embedding(timestep, self.cfg.freq_dim))
        mod = self.time_proj(nn.silu(temb.astype(self.cfg.compute_dtype)))
        return temb, mod.astype(jnp.float32).reshape(temb.shape[0], 6, self.cfg.dim)

    def text(self, context: jax.Array) -> jax.Array:
        return layers.constrain(self.text_embedder(context.astype(self.cfg.compute_dtype)),
                                ("batch", "kv_length", "embed"))

    def __call__(self, timestep: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        temb, mod = self.time(timestep)
        return temb, mod, self.text(context)


class DiTBlock(nn.Module):
    """One Wan block, with TTM's two added layers when `ttm`. x `[B, N, D]` -> (x, None) (the `nn.scan` carry form).

    context `[B, Lc, D]`, modulation `[B, 6, D]` f32, rope cos/sin `[N, head_dim]`, local_context `[B, Ll, D]`,
    token_ids / cross_token_ids `[B, N]`, local_ids `[B, Ll]` (None where unused); token_ids is a
    `sparse_attention.ObjectSort` of them under `attention_sparse`.
    """

    cfg: DiTConfig
    ttm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, modulation: jax.Array, rope_cos: jax.Array,
                 rope_sin: jax.Array, local_context: jax.Array | None, token_ids: jax.Array | None,
                 cross_token_ids: jax.Array | None, local_ids: jax.Array | None) -> tuple[jax.Array, None]:
        c = self.cfg
        dt, pdt = c.compute_dtype, c.weight_dtype
        rope = (rope_cos, rope_sin)
        table = self.param("scale_shift_table",
                           layers.logical_init(lambda k, s, d: jax.random.normal(k, s, d) / c.dim**0.5,
                                               (None, None, "embed")), (1, 6, c.dim), pdt)
        mod = table.astype(jnp.float32) + modulation  # [B, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i:i + 1] for i in range(6))
        attn = dict(dim=c.dim, num_heads=c.num_heads, eps=c.eps, qk_norm=c.qk_norm, impl=c.attention, dtype=dt,
                    param_dtype=pdt, context_impl=c.context_impl)

        # 1. self-attention, AdaLN-modulated and gated
        x = layers.gradient_barrier(x)
        h = (layers.LayerNorm(c.eps, name="norm1")(x) * (1 + scale) + shift).astype(dt)
        out = layers.Attention(**attn, name="attn1")(h, rope=rope)
        x = (x.astype(jnp.float32) + out.astype(jnp.float32) * gate).astype(dt)
        x = layers.constrain(x, ("batch", "length", "embed"))
        if self.ttm:
            x = ttm_layers.MaskedSelfAttention(**attn, masked=c.mask_self, name="masked_self_attn")(
                x, rope, token_ids)

        # 2. cross-attention to the caption
        x = layers.gradient_barrier(x)
        if c.cross_attn_norm:
            h = layers.LayerNorm(c.eps, affine=True, param_dtype=pdt, name="norm2")(x).astype(dt)
        else:
            h = x
        x = x + layers.Attention(**attn, name="attn2")(h, context=context).astype(dt)
        if self.ttm:
            x = ttm_layers.MaskedCrossAttention(**attn, masked=c.mask_cross, name="masked_cross_attn")(
                x, local_context, cross_token_ids, local_ids)
        x = layers.constrain(x, ("batch", "length", "embed"))

        # 3. feed-forward, AdaLN-modulated and gated
        x = layers.gradient_barrier(x)
        h = (layers.LayerNorm(c.eps, name="norm3")(x) * (1 + c_scale) + c_shift).astype(dt)
        out = layers.FeedForward(c.dim, c.ffn_dim, dtype=dt, param_dtype=pdt, name="ffn")(h)
        x = (x.astype(jnp.float32) + out.astype(jnp.float32) * c_gate).astype(dt)
        return layers.constrain(x, ("batch", "length", "embed")), None


def unroll_for(cfg: DiTConfig, count: int) -> int:
    """How many of the `count` scanned blocks one loop iteration runs (`nn.scan(unroll=...)`).

    `config.model.scan_unroll` when > 0; 0 (the default) picks per backend: on CPU all of them (no loop: the XLA CPU
    while loop slices every layer's params and stacked activations in and out of the loop, a large share of a small
    step's op time, and blocks fusion across layers), one on GPU / TPU (a loop: one compiled block, fast
    compiles). The params keep the stacked `scan_layers` layout either way.
    """
    if cfg.scan_unroll > 0:
        return min(cfg.scan_unroll, count)
    return count if jax.default_backend() == "cpu" else 1


def _block_class(cfg: DiTConfig, unrolled: bool) -> type[nn.Module]:
    # Inside a scan loop, CSE across iterations cannot undo remat, so prevent_cse is only needed when unrolled.
    return remat.maybe_remat(DiTBlock, cfg.remat_policy, prevent_cse=unrolled)


class DiT(nn.Module):
    """The TTM video DiT (module docstring). `config`: `config.model` (ConfigDict) or a `DiTConfig`."""

    config: Any
    in_channels: int
    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array, timestep: jax.Array, context: jax.Array, *,
                 local_context: jax.Array | None = None, token_ids: jax.Array | None = None,
                 cross_token_ids: jax.Array | None = None, local_ids: jax.Array | None = None) -> jax.Array:
        """x `[B, T', H', W', in_channels]`, timestep `[B]` (0..1000), context `[B, Lc, text_dim]`;
        local_context `[B, S*Lp, text_dim]`, token_ids / cross_token_ids int32 `[B, N]`, local_ids int32 `[B, S*Lp]`
        (local_context when `ttm_layers > 0`; token_ids with masked self-attention; cross_token_ids and local_ids
        with masked cross-attention)
        -> `[B, T', H', W', out_channels]` float32."""
        c = DiTConfig.from_config(self.config)
        dt, pdt = c.compute_dtype, c.weight_dtype
        b, t, hh, ww, n_tok = self._check_inputs(c, x, timestep, context, local_context, token_ids, cross_token_ids,
                                                 local_ids)
        pt, ph, pw = c.patch_size
        grid = (t // pt, hh // ph, ww // pw)

        x = nn.Conv(c.dim, kernel_size=c.patch_size, strides=c.patch_size, padding="VALID", dtype=dt,
                    param_dtype=pdt,
                    kernel_init=layers.logical_init(nn.initializers.lecun_normal(),
                                                    (None, None, None, "in_channels", "embed")),
                    bias_init=layers.logical_init(nn.initializers.zeros_init(), ("embed",)),
                    name="patch_embedding")(x.astype(dt))
        x = layers.constrain(x.reshape(b, n_tok, c.dim), ("batch", "length", "embed"))
        # the tables split with the tokens over the mesh's `context` axis (config.mesh.context; `length` rule)
        rope_cos, rope_sin = (layers.constrain(r, ("length", None))
                              for r in layers.rope_3d(c.head_dim, grid, c.rope_max_seq_len))

        embedder = ConditionEmbedder(c, name="condition_embedder")
        temb, modulation, context = embedder(timestep, context)
        if c.ttm_layers > 0:
            local_context = embedder.text(local_context)
        else:
            local_context = token_ids = cross_token_ids = local_ids = None
        if not c.mask_self:
            token_ids = None
        if not c.mask_cross:
            cross_token_ids = None
        if c.attention_sparse and token_ids is not None:
            # Object-sparse masked self-attention: sort the tokens by id once here, and every masked self-attention
            # layer (scanned or not) reuses the permutation and block ranges (the ObjectSort rides in token_ids).
            # Under context parallelism the per-shard op is the XLA block loop (context_parallel), so its block sizes.
            token_ids = sparse_attention.sort_objects(
                token_ids, impl=c.attention if layers.context_size() == 1 else "xla")
        args = (context, modulation, rope_cos, rope_sin, local_context, token_ids, cross_token_ids, local_ids)

        groups = [(c.ttm_layers, True, "ttm_blocks", 0), (c.num_layers - c.ttm_layers, False, "blocks", c.ttm_layers)]
        for count, ttm, scan_name, first in groups:
            if count == 0:
                continue
            if c.scan_layers:
                unroll = unroll_for(c, count)
                stack = nn.scan(_block_class(c, unroll > 1), variable_axes={"params": 0},
                                split_rngs={"params": True}, in_axes=(nn.broadcast,) * len(args), length=count,
                                unroll=unroll, metadata_params={nn.PARTITION_NAME: "layers"})
                x, _ = stack(c, ttm, name=scan_name)(x, *args)
            else:
                block = _block_class(c, True)
                for i in range(first, first + count):
                    x, _ = block(c, ttm, name=f"blocks_{i}")(x, *args)

        table = self.param("scale_shift_table",
                           layers.logical_init(lambda k, s, d: jax.random.normal(k, s, d) / c.dim**0.5,
                                               (None, None, "embed")), (1, 2, c.dim), pdt)
        mod = table.astype(jnp.float32) + temb[:, None].astype(jnp.float32)  # [B, 2, D]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        x = (layers.LayerNorm(c.eps, name="norm_out")(x) * (1 + scale) + shift).astype(dt)
        x = layers.dense(pt * ph * pw * self.out_channels, ("embed", "out_channels"), dtype=dt, param_dtype=pdt,
                         name="proj_out")(x)
        # unpatchify: [B, (f, h, w), (pt, ph, pw, C)] -> [B, f*pt, h*ph, w*pw, C]
        f, gh, gw = grid
        x = x.reshape(b, f, gh, gw, pt, ph, pw, self.out_channels)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, hh, ww, self.out_channels)
        return x.astype(jnp.float32)

    def _check_inputs(self, c: DiTConfig, x: jax.Array, timestep: jax.Array, context: jax.Array,
                      local_context: jax.Array | None, token_ids: jax.Array | None, cross_token_ids: jax.Array | None,
                      local_ids: jax.Array | None) -> tuple[int, int, int, int, int]:
        """Raises a ValueError naming the argument and the fix; returns (B, T', H', W', N)."""
        where = "ttm_jax/backbones/wan/model.py: DiT"
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(f"{where}: x must be [B, T', H', W', in_channels={self.in_channels}], got {x.shape}; "
                             f"in_channels is ttm_jax.config.in_channels(config) (conditioning.stage_input)")
        b, t, hh, ww, _ = x.shape
        pt, ph, pw = c.patch_size
        if t % pt or hh % ph or ww % pw:
            raise ValueError(f"{where}: latent (T', H', W') = {(t, hh, ww)} is not divisible by "
                             f"config.model.patch_size={c.patch_size}")
        n_tok = (t // pt) * (hh // ph) * (ww // pw)
        shards = layers.context_size()
        if n_tok % shards:
            raise ValueError(f"{where}: the {n_tok} video tokens of latent (T', H', W') = {(t, hh, ww)} do not split "
                             f"over the mesh's context axis of size {shards}; choose a config.mesh.context dividing "
                             f"{n_tok}, or a latent grid whose token count it divides")
        if timestep.shape != (b,):
            raise ValueError(f"{where}: timestep must be [B] = ({b},), got {timestep.shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != c.text_dim:
            raise ValueError(f"{where}: context must be [B={b}, Lc, text_dim={c.text_dim}], got {context.shape} "
                             f"(config.model.text_dim must equal text_encoder.d_model)")
        if c.ttm_layers == 0:
            return b, t, hh, ww, n_tok
        if local_context is None:
            raise ValueError(f"{where}: config.model.ttm_layers={c.ttm_layers} needs local_context "
                             f"[B, S*Lp, text_dim] (the local prompts' embeddings, slot 0 = caption); "
                             f"set ttm_layers=0 for a model without TTM layers (stage 1)")
        if local_context.ndim != 3 or local_context.shape[0] != b or local_context.shape[-1] != c.text_dim:
            raise ValueError(f"{where}: local_context must be [B={b}, S*Lp, text_dim={c.text_dim}], "
                             f"got {local_context.shape}")
        ll = local_context.shape[1]
        needed = [("token_ids", token_ids, n_tok)] if c.mask_self else []
        if c.mask_cross:
            needed += [("cross_token_ids", cross_token_ids, n_tok), ("local_ids", local_ids, ll)]
        for name, ids, length in needed:
            if ids is None:
                raise ValueError(f"{where}: config.model.ttm_layers={c.ttm_layers} with masked added layers needs "
                                 f"{name} int32 [B, {length}] (ttm_jax/models/masks.py builds them); set "
                                 f"ttm_masked=False for the unmasked baseline or ttm_layers=0 for none")
            if ids.shape != (b, length):
                raise ValueError(f"{where}: {name} must be int32 [B, {length}] = {(b, length)}, got {ids.shape}")
        if not c.mask_cross and local_ids is not None and local_ids.shape != (b, ll):
            raise ValueError(f"{where}: local_ids must be int32 [B, {ll}], got {local_ids.shape}")
        return b, t, hh, ww, n_tok


# ---------------------------------------------------------------------------------------------------------------------
# Parameter surgery (unboxed trees: plain arrays; use `nn.unbox` first)


def init_inputs(cfg: DiTConfig, in_channels: int, *, batch: int = 1, grid: tuple[int, int, int] | None = None,
                text_len: int = 1, local_len: int = 1, abstract: bool = False
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`(args, kwargs)` for `DiT.init` / `DiT.apply`: the one definition of the DiT's inputs.

    args `(x [B, T', H', W', in_channels] f32, timestep [B] f32, context [B, text_len, text_dim] f32)`; with TTM layers
    kwargs `local_context [B, local_len, text_dim] f32, token_ids / cross_token_ids [B, N] i32, local_ids [B, local_len]
    i32`. `grid` is the latent `(T', H', W')` (default: one patch, the smallest input that builds every parameter:
    parameter shapes depend on neither the grid nor the text lengths). `abstract`: `jax.ShapeDtypeStruct`s (for
    `jax.eval_shape` / `.lower`) instead of zeros.
    """
    pt, ph, pw = cfg.patch_size
    t, h, w = grid if grid is not None else (pt, ph, pw)
    n = (t // pt) * (h // ph) * (w // pw)

    def make(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype) if abstract else jnp.zeros(shape, dtype)

    f32, i32 = jnp.float32, jnp.int32
    args = (make((batch, t, h, w, in_channels), f32), make((batch,), f32), make((batch, text_len, cfg.text_dim), f32))
    kwargs: dict[str, Any] = {}
    if cfg.ttm_layers:
        kwargs = dict(local_context=make((batch, local_len, cfg.text_dim), f32), token_ids=make((batch, n), i32),
                      cross_token_ids=make((batch, n), i32), local_ids=make((batch, local_len), i32))
    return args, kwargs


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))


def expand_input_channels(params: Mapping, in_channels: int) -> dict:
    """Widens `patch_embedding/kernel [pt, ph, pw, C, D]` to `in_channels`, the new channels zero.

    A T2V backbone with C = latent_channels inputs then sees only the noisy latent (channels first, as
    `conditioning.stage_input` orders them) and behaves exactly as before. Other leaves are returned as they are.
    """
    return layers.widen_input_channels(params, ("patch_embedding", "kernel"), in_channels,
                                       where="dit.expand_input_channels")


def graft_backbone(params: Mapping, backbone: Mapping, *, ttm_layers: int, scan_layers: bool) -> dict:
    """A stage-2 DiT's params whose backbone is `backbone` and whose TTM layers stay as in `params`.

    Args:
      params: freshly initialised (unboxed) params of the DiT with `ttm_layers` TTM blocks and `in_channels` inputs.
      backbone: (unboxed) params of the same shapes with `ttm_layers=0` (e.g. converted Wan T2V weights), in the same
        `scan_layers` layout; its patch embedding may have fewer input channels (zero-padded here).
      ttm_layers, scan_layers: of `params`' model.

    Every leaf of `params` outside `masked_self_attn` / `masked_cross_attn` must come from `backbone`; a missing or
    mis-shaped one raises, naming it. Since the TTM layers' output projections are zero, the result computes exactly
    what the backbone does.
    """
    fresh = _flat(params)
    in_channels = fresh[("patch_embedding", "kernel")].shape[3]
    back = _flat(expand_input_channels(backbone, in_channels))
    out = dict(fresh)
    filled = set()
    for key, value in back.items():
        targets: list[tuple[tuple[str, ...], Any]]
        if scan_layers and key[0] == "blocks":
            value = jnp.asarray(value)
            targets = []
            if ttm_layers > 0:
                targets.append((("ttm_blocks",) + key[1:], value[:ttm_layers]))
            if ttm_layers < value.shape[0]:
                targets.append((key, value[ttm_layers:]))
        else:
            targets = [(key, value)]
        for tkey, tval in targets:
            if tkey not in fresh:
                raise KeyError(f"dit.graft_backbone: backbone leaf {'/'.join(key)} has no place in the stage-2 "
                               f"params (is scan_layers={scan_layers} the backbone's layout?)")
            if tuple(fresh[tkey].shape) != tuple(np.shape(tval)):
                raise ValueError(f"dit.graft_backbone: {'/'.join(tkey)} is {tuple(fresh[tkey].shape)} in the "
                                 f"stage-2 model but {tuple(np.shape(tval))} from the backbone; check "
                                 f"config.model shapes against the converted checkpoint")
            out[tkey] = jnp.asarray(tval, fresh[tkey].dtype)
            filled.add(tkey)
    left = [k for k in fresh if k not in filled and not any(m in k for m in TTM_MODULES)]
    if left:
        raise KeyError(f"dit.graft_backbone: backbone lacks {['/'.join(k) for k in left[:5]]} "
                       f"({len(left)} leaves); was it converted with the same config.model?")
    return traverse_util.unflatten_dict(out)


def unscan_layout(params: Mapping, *, ttm_layers: int) -> dict:
    """`scan_layers=True` params (`ttm_blocks`, `blocks` stacks) -> `scan_layers=False` (`blocks_0..blocks_{L-1}`)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in _flat(params).items():
        if key[0] in ("ttm_blocks", "blocks"):
            first = 0 if key[0] == "ttm_blocks" else ttm_layers
            for i in range(value.shape[0]):
                out[(f"blocks_{first + i}",) + key[1:]] = value[i]
        else:
            out[key] = value
    return traverse_util.unflatten_dict(out)


def scan_layout(params: Mapping, *, ttm_layers: int) -> dict:
    """`scan_layers=False` params (`blocks_i`) -> `scan_layers=True` (`ttm_blocks` = blocks < K, `blocks` the rest)."""
    groups: dict[tuple[str, ...], dict[int, Any]] = {}
    out: dict[tuple[str, ...], Any] = {}
    for key, value in _flat(params).items():
        if key[0].startswith("blocks_"):
            i = int(key[0].split("_")[1])
            stack = "ttm_blocks" if i < ttm_layers else "blocks"
            groups.setdefault((stack,) + key[1:], {})[i] = value
        else:
            out[key] = value
    for key, by_index in groups.items():
        out[key] = jnp.stack([jnp.asarray(by_index[i]) for i in sorted(by_index)])
    return traverse_util.unflatten_dict(out)
