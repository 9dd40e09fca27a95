"""A T5-family text encoder (T5 v1.1, ByT5, umT5) in Flax Linen, numerically equal to transformers' encoders.

Per layer: RMS LayerNorm (T5's: no mean, no bias) -> bidirectional self-attention with a learned relative-position
bias (bucketed distances, no 1/sqrt(d) scaling) -> residual; RMS LayerNorm -> gated-GELU FFN (`gelu_tanh(x wi_0) *
(x wi_1) wo`) -> residual; a final RMS LayerNorm. T5 learns one position bias (in layer 0) shared by all layers;
umT5 (`per_layer_bias=True`) learns one per layer. Layers are one `nn.scan` (parameters stacked on a leading
`layers` axis), so umT5-XXL's 24 layers compile once.

`T5Encoder(config.text_encoder)(ids [B, L] int32, mask [B, L] bool) -> [B, L, d_model]`. Padded positions attend
to the real tokens (as transformers); `zero_padding=True` zeroes their outputs, as Wan's pipeline does before the
embeddings enter cross-attention. Parameters are stored in `param_dtype` (float32 by default); matmuls run in
`dtype`, norms and softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttm_jax.models import norms


@dataclasses.dataclass(frozen=True)
class T5Spec:
    """The hashable shape of an encoder, read from `config.text_encoder`."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    per_layer_bias: bool = False
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"

    @classmethod
    def from_config(cls, config: Any) -> T5Spec:
        if isinstance(config, T5Spec):
            return config
        ff = config.get("feed_forward", "gated-gelu")
        if ff != "gated-gelu":
            raise ValueError(f"config.text_encoder.feed_forward: {ff!r} is not supported; T5 v1.1 / ByT5 / umT5 use "
                             f"'gated-gelu'")
        return cls(vocab_size=int(config.vocab_size), d_model=int(config.d_model), num_layers=int(config.num_layers),
                   num_heads=int(config.num_heads), d_kv=int(config.d_kv), d_ff=int(config.d_ff),
                   per_layer_bias=bool(config.per_layer_bias),
                   num_buckets=int(config.relative_attention_num_buckets),
                   max_distance=int(config.relative_attention_max_distance), eps=float(config.eps),
                   dtype=str(config.get("dtype", "float32")), param_dtype=str(config.get("param_dtype", "float32")))


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of `key_pos - query_pos`, int32 `[q_len, k_len]` in [0, num_buckets).

    Half the buckets for each sign; inside a half, distances below `num_buckets // 4` get a bucket each, larger ones
    share logarithmically wider buckets up to `max_distance`, beyond which all distances share the last bucket.
    Static shapes, so computed in numpy at trace time.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    exact = half // 2
    # float32 as the reference implementations, so bucket edges agree exactly; n = 0 never takes the log branch,
    # max(n, 1) only keeps the cast below finite
    log_ratio = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(exact)) / np.float32(
        math.log(max_distance / exact))
    large = exact + (log_ratio * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    out = out + np.where(n < exact, n, large)
    return out.astype(np.int32)


def _dense(features: int, std: float, names: tuple[str, str], dtype, param_dtype, name: str) -> nn.Dense:
    init = nn.with_logical_partitioning(nn.initializers.normal(std), names)
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=init, name=name)


class RelativePositionBias(nn.Module):
    """Learned bias per (bucket, head): `(q_len, k_len) -> float32 [1, H, q_len, k_len]`."""

    spec: T5Spec

    @nn.compact
    def __call__(self, q_len: int, k_len: int) -> jax.Array:
        s = self.spec
        table = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(s.d_model**-0.5), (None, None)), (s.num_buckets, s.num_heads), s.param_dtype)
        buckets = relative_position_buckets(q_len, k_len, s.num_buckets, s.max_distance)
        return jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None]


class SelfAttention(nn.Module):
    """Unscaled multi-head self-attention with an additive bias: `[B, L, D] -> [B, L, D]`."""

    spec: T5Spec

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
        s = self.spec
        b, length, _ = x.shape
        inner = s.num_heads * s.d_kv
        # Mesh-TF's init; the 1/sqrt(d_kv) that other attentions apply to logits is folded into q's init
        dense = lambda n, f, std, names: _dense(f, std, names, s.dtype, s.param_dtype, n)
        q = dense("q", inner, (s.d_model * s.d_kv) ** -0.5, ("text_embed", "heads"))(x)
        k = dense("k", inner, s.d_model**-0.5, ("text_embed", "heads"))(x)
        v = dense("v", inner, s.d_model**-0.5, ("text_embed", "heads"))(x)
        q, k, v = (t.reshape(b, length, s.num_heads, s.d_kv) for t in (q, k, v))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        # a fully padded row stays finite (uniform weights), never NaN
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(s.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, inner)
        return dense("o", s.d_model, inner**-0.5, ("heads", "text_embed"))(out)


class GatedGeluFFN(nn.Module):
    """`gelu_tanh(x wi_0) * (x wi_1) wo`: `[B, L, D] -> [B, L, D]`."""

    spec: T5Spec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        dense = lambda n, f, std, names: _dense(f, std, names, s.dtype, s.param_dtype, n)
        gate = jax.nn.gelu(dense("wi_0", s.d_ff, s.d_model**-0.5, ("text_embed", "mlp"))(x), approximate=True)
        h = gate * dense("wi_1", s.d_ff, s.d_model**-0.5, ("text_embed", "mlp"))(x)
        return dense("wo", s.d_model, s.d_ff**-0.5, ("mlp", "text_embed"))(h)


class T5Layer(nn.Module):
    """One encoder block, the body of the `nn.scan`: `(x [B, L, D], mask, shared bias or None) -> (x, None)`."""

    spec: T5Spec

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, shared_bias: jax.Array | None):
        s = self.spec
        norm = lambda n: norms.RMSNorm(s.eps, "text_embed", s.dtype, s.param_dtype, name=n)
        if s.per_layer_bias:
            bias = RelativePositionBias(s, name="relative_bias")(x.shape[1], x.shape[1])
        else:
            bias = shared_bias
        x = x + SelfAttention(s, name="attention")(norm("attention_norm")(x), mask, bias)
        x = x + GatedGeluFFN(s, name="ffn")(norm("ffn_norm")(x))
        return x, None


class T5Encoder(nn.Module):
    """`config`: `config.text_encoder` (or a `T5Spec`). `(ids int32 [B, L], mask bool [B, L]) -> [B, L, d_model]`."""

    config: Any

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array, *, zero_padding: bool = False) -> jax.Array:
        s = T5Spec.from_config(self.config)
        mask = jnp.asarray(mask, bool)
        embed = nn.Embed(s.vocab_size, s.d_model, dtype=s.dtype, param_dtype=s.param_dtype, name="embedding",
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                     ("vocab", "text_embed")))
        x = embed(jnp.asarray(ids, jnp.int32))
        length = ids.shape[1]
        shared = None if s.per_layer_bias else RelativePositionBias(s, name="relative_bias")(length, length)
        layers = nn.scan(T5Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=s.num_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(s, name="layers")(x, mask, shared)
        x = norms.RMSNorm(s.eps, "text_embed", s.dtype, s.param_dtype, name="final_norm")(x)
        if zero_padding:
            x = jnp.where(mask[..., None], x, 0)
        return x


def init_params(config: Any, rng: jax.Array, length: int = 8) -> dict:
    """Random parameters (unboxed) for `config.text_encoder`, e.g. the tiny configs' frozen encoder."""
    model = T5Encoder(config)
    ids = jnp.zeros((1, length), jnp.int32)
    variables = jax.jit(model.init)(rng, ids, jnp.ones((1, length), bool))
    return nn.meta.unbox(variables["params"])
